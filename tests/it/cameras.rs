//! Camera sources against real parts: YUYV and MJPEG conversion on known
//! pixels, `edgeinfer devices` on this machine and V4L2 errors. The HTTP
//! camera is in `http_camera.rs`.

use std::process::Command;
use std::sync::atomic::AtomicBool;
use std::sync::Arc;
use std::time::Instant;

use edgeinfer::config::{PixelFormat, SourceConfig};
use edgeinfer::message::{InputQueue, Overflow};
use edgeinfer::metrics::PipelineMetrics;
use edgeinfer::source::{v4l2, SourceCtx};
use image::RgbImage;

pub(crate) const RED: [u8; 3] = [220, 30, 30];
pub(crate) const BLUE: [u8; 3] = [20, 40, 210];

/// A source context with a blocking queue of 100 and fresh metrics.
pub(crate) fn ctx() -> SourceCtx {
    SourceCtx {
        pipeline: "cam".into(),
        queue: InputQueue::new(100, Overflow::Block),
        metrics: Arc::new(PipelineMetrics::new("cam", "m", 0.0)),
        stop: Arc::new(AtomicBool::new(false)),
        base_dir: std::env::temp_dir(),
    }
}

#[test]
fn yuyv_known_colours_convert_within_two_levels() {
    // BT.601 limited-range YCbCr of pure colours, with the RGB they stand for.
    let cases: [([u8; 3], [u8; 3]); 6] = [
        ([235, 128, 128], [255, 255, 255]),
        ([16, 128, 128], [0, 0, 0]),
        ([81, 90, 240], [255, 0, 0]),
        ([145, 54, 34], [0, 255, 0]),
        ([41, 240, 110], [0, 0, 255]),
        ([126, 128, 128], [128, 128, 128]),
    ];
    // One row of pixel pairs (Y0 U Y1 V), each pair one colour, padded to a stride of 32 bytes;
    // the second row repeats the first.
    let width = 2 * cases.len();
    let stride = 32;
    let mut src = vec![0xAAu8; stride * 2];
    for row in 0..2 {
        for (i, (ycc, _)) in cases.iter().enumerate() {
            let o = row * stride + i * 4;
            src[o..o + 4].copy_from_slice(&[ycc[0], ycc[1], ycc[0], ycc[2]]);
        }
    }
    let img = v4l2::yuyv_to_rgb(&src, width as u32, 2, stride).unwrap();
    for y in 0..2 {
        for (i, (ycc, want)) in cases.iter().enumerate() {
            for x in [2 * i, 2 * i + 1] {
                let got = img.get_pixel(x as u32, y).0;
                for c in 0..3 {
                    assert!((got[c] as i32 - want[c] as i32).abs() <= 2, "YCbCr {ycc:?} -> {got:?}, want {want:?}");
                }
            }
        }
    }
    // Two pixels of a pair keep their own luma.
    let pair = v4l2::yuyv_to_rgb(&[16, 128, 235, 128], 2, 1, 4).unwrap();
    assert_eq!(pair.as_raw(), &[0, 0, 0, 255, 255, 255]);
}

#[test]
fn yuyv_rejects_odd_widths_and_short_buffers() {
    let e = v4l2::yuyv_to_rgb(&[0; 64], 3, 2, 6).unwrap_err();
    assert!(e.contains("even width"), "{e}");
    let e = v4l2::yuyv_to_rgb(&[0; 10], 4, 2, 8).unwrap_err();
    assert!(e.contains("truncated"), "{e}");
    let e = v4l2::yuyv_to_rgb(&[0; 64], 4, 2, 6).unwrap_err();
    assert!(e.contains("stride"), "{e}");
}

/// `jpeg` without its DHT segments, like the frames of many UVC webcams.
fn strip_huffman_tables(jpeg: &[u8]) -> Vec<u8> {
    let mut out = jpeg[..2].to_vec();
    let mut pos = 2;
    while jpeg[pos + 1] != 0xDA {
        let len = u16::from_be_bytes([jpeg[pos + 2], jpeg[pos + 3]]) as usize;
        if jpeg[pos + 1] != 0xC4 {
            out.extend_from_slice(&jpeg[pos..pos + 2 + len]);
        }
        pos += 2 + len;
    }
    out.extend_from_slice(&jpeg[pos..]);
    out
}

#[test]
fn mjpeg_frames_decode_with_and_without_huffman_tables() {
    // Left half red, right half blue.
    let img = RgbImage::from_fn(64, 48, |x, _| image::Rgb(if x < 32 { RED } else { BLUE }));
    let mut jpg = Vec::new();
    image::codecs::jpeg::JpegEncoder::new_with_quality(&mut jpg, 90).encode_image(&img).unwrap();
    let rgb = v4l2::mjpeg_to_rgb(&jpg).unwrap();
    assert_eq!(rgb.dimensions(), (64, 48));
    for (x, want) in [(8, RED), (56, BLUE)] {
        let got = rgb.get_pixel(x, 24).0;
        assert!(got.iter().zip(want).all(|(g, w)| (*g as i32 - w as i32).abs() <= 10), "{got:?} vs {want:?}");
    }
    let bare = strip_huffman_tables(&jpg);
    assert!(bare.len() < jpg.len());
    assert!(edgeinfer::preprocess::decode_image(&bare).is_err(), "without tables the decoder alone fails");
    assert_eq!(v4l2::mjpeg_to_rgb(&bare).unwrap(), rgb, "the standard tables give the same pixels");
    assert!(v4l2::mjpeg_to_rgb(&jpg[..jpg.len() / 3]).is_err());
    assert!(v4l2::mjpeg_to_rgb(&[]).is_err());
}

#[test]
fn v4l2_missing_device_is_an_error_naming_it() {
    let cfg = SourceConfig::V4l2 {
        device: "/dev/video-edgeinfer-missing".into(),
        width: 640,
        height: 480,
        fps: Some(30),
        pixel_format: Some(PixelFormat::Mjpeg),
        max_fps: None,
    };
    let e = v4l2::run(&cfg, &ctx()).unwrap_err().0;
    if !cfg!(feature = "v4l2") {
        assert!(e.contains("needs edgeinfer built with the `v4l2` feature"), "{e}");
        return;
    }
    assert!(e.contains("/dev/video-edgeinfer-missing") && e.contains("no such device"), "{e}");
    // A character device that is not a camera is named too.
    let cfg = SourceConfig::V4l2 {
        device: "/dev/null".into(),
        width: 640,
        height: 480,
        fps: None,
        pixel_format: None,
        max_fps: None,
    };
    let e = v4l2::run(&cfg, &ctx()).unwrap_err().0;
    assert!(e.contains("/dev/null") && e.contains("not a V4L2 device"), "{e}");
}

#[test]
fn devices_command_reports_no_cameras_clearly_and_emits_json() {
    let has_video =
        std::fs::read_dir("/dev").unwrap().any(|e| e.unwrap().file_name().to_string_lossy().starts_with("video"));
    let out = Command::new(env!("CARGO_BIN_EXE_edgeinfer")).arg("devices").output().unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(0), "{text}{}", String::from_utf8_lossy(&out.stderr));
    for section in ["Cameras (V4L2):", "Serial ports:", "IIO sensors:"] {
        assert!(text.contains(section), "{text}");
    }
    if !has_video {
        assert!(text.contains(edgeinfer::cmd::devices::NO_CAMERAS), "{text}");
    }
    let out = Command::new(env!("CARGO_BIN_EXE_edgeinfer")).args(["devices", "--json"]).output().unwrap();
    assert_eq!(out.status.code(), Some(0));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).expect("devices --json is JSON");
    for key in ["video", "serial", "iio"] {
        assert!(v[key].is_array(), "{v}");
    }
    if !has_video {
        assert_eq!(v["video"].as_array().unwrap().len(), 0);
    }
}

/// Not a test: median per-frame cost of MJPEG decode and YUYV conversion at
/// 640x480, printed. `cargo test --test it camera_conversion_timings -- --ignored --nocapture`
#[test]
#[ignore]
fn camera_conversion_timings() {
    // A gradient with sensor-like noise, so the JPEG is about the size a webcam sends.
    let mut seed = 0x2545_f491_u32;
    let img = RgbImage::from_fn(640, 480, |x, y| {
        seed = seed.wrapping_mul(1_664_525).wrapping_add(1_013_904_223);
        let n = (seed >> 27) as u8;
        image::Rgb([(x * 255 / 640) as u8 ^ n, (y * 255 / 480) as u8 ^ n, ((x ^ y) & 0xFF) as u8 ^ n])
    });
    let mut jpg = Vec::new();
    image::codecs::jpeg::JpegEncoder::new_with_quality(&mut jpg, 80).encode_image(&img).unwrap();
    let yuyv: Vec<u8> = (0..640 * 480 * 2).map(|i| (i * 7 % 251) as u8).collect();
    let median = |f: &mut dyn FnMut()| {
        let mut t: Vec<f64> = (0..60)
            .map(|_| {
                let s = Instant::now();
                f();
                s.elapsed().as_secs_f64() * 1e3
            })
            .collect();
        t.sort_by(f64::total_cmp);
        t[t.len() / 2]
    };
    let mjpeg = median(&mut || {
        std::hint::black_box(v4l2::mjpeg_to_rgb(&jpg).unwrap());
    });
    let convert = median(&mut || {
        std::hint::black_box(v4l2::yuyv_to_rgb(&yuyv, 640, 480, 1280).unwrap());
    });
    println!("640x480: MJPEG decode {mjpeg:.3} ms ({} byte JPEG), YUYV->RGB {convert:.3} ms (median of 60)", jpg.len());
}
