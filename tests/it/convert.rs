//! Converted models (`edgeinfer convert`, NNEF), the start-up cache and the
//! `threads` setting, on the shipped models: a converted or cached model must
//! give the ONNX model's outputs, keep its names, shapes and quantization, and
//! a damaged cache must never stop a model from loading.

use std::path::{Path, PathBuf};
use std::time::Duration;

use edgeinfer::engine::{self, LoadOptions, Model, Origin};
use edgeinfer::tensor::Tensor;

use crate::parity::{self, Tolerance, FLOAT};
use crate::support::{edgeinfer, free_port, wait_port, Daemon, Subscriber};

/// Every shipped model with ONNX Runtime references, and its parity bound (as in parity.rs).
fn models_with_refs() -> Vec<(&'static str, Tolerance)> {
    let mut v = vec![
        ("digits_cnn_f32", FLOAT),
        ("digits_cnn_int8", parity::int8(2.0)),
        ("digits_cnn_int8_qop", parity::int8(2.0)),
        ("vibration_f32", FLOAT),
        ("vibration_int8", parity::int8(2.0)),
        ("breast_cancer_trees", FLOAT),
        ("breast_cancer_mlp_f32", FLOAT),
        ("mobilenetv2_int8", parity::int8(6.0)),
        ("breast_cancer_mlp_dynint8", FLOAT),
        ("digits_cnn_dynint8", parity::DYNAMIC),
        ("mobilenetv2_dynint8", parity::DYNAMIC),
        ("multi_io", FLOAT),
        ("tree_binary_repro", FLOAT),
    ];
    // Not committed (14 MB); `make_models.py --only mobilenetv2_f32` makes it.
    if crate::model("mobilenetv2_f32.onnx").exists() {
        v.push(("mobilenetv2_f32", FLOAT));
    }
    v
}

fn ref_inputs(stem: &str, model: &Model) -> Vec<Tensor> {
    let dir = crate::root().join("models/ref").join(stem);
    (0..model.inputs().len()).map(|i| Tensor::read_npy(&dir.join(format!("in{i}.npy"))).unwrap()).collect()
}

fn synthetic_inputs(model: &Model) -> Vec<Tensor> {
    model.inputs().iter().enumerate().map(|(i, s)| edgeinfer::cmd::bench::synthetic_input(s, i as u64)).collect()
}

/// Runs both models on the same inputs; returns the largest output difference.
fn max_output_diff(a: &Model, b: &Model, inputs: &[Tensor]) -> f64 {
    let x = a.session().unwrap().run(inputs).unwrap();
    let y = b.session().unwrap().run(inputs).unwrap();
    assert_eq!(x.len(), y.len());
    let mut worst = 0.0f64;
    for (p, q) in x.iter().zip(&y) {
        assert_eq!((&p.shape, p.elem_type()), (&q.shape, q.elem_type()));
        let (p, q) = (p.data.to_f64_vec(), q.data.to_f64_vec());
        worst = p.iter().zip(&q).map(|(u, v)| (u - v).abs()).fold(worst, f64::max);
    }
    worst
}

fn json<T: serde::Serialize>(v: &T) -> serde_json::Value {
    serde_json::to_value(v).unwrap()
}

/// What must survive conversion: everything but the file and the optimised plan's timings.
fn assert_same_model(onnx: &Model, other: &Model) {
    assert_eq!(json(&onnx.inputs()), json(&other.inputs()));
    assert_eq!(json(&onnx.outputs()), json(&other.outputs()));
    let (a, b) = (onnx.info(), other.info());
    assert_eq!(
        (&a.sha256, a.size_bytes, &a.quantization, &a.int8_path, &a.op_counts, &a.rewrites, a.opset, &a.producer),
        (&b.sha256, b.size_bytes, &b.quantization, &b.int8_path, &b.op_counts, &b.rewrites, b.opset, &b.producer)
    );
}

#[test]
fn converted_shipped_models_match_onnx_and_onnxruntime() {
    let dir = tempfile::tempdir().unwrap();
    for (ix, (stem, tol)) in models_with_refs().into_iter().enumerate() {
        let onnx = Model::load(&crate::model(&format!("{stem}.onnx")), &LoadOptions::default()).unwrap();
        // Both container forms, alternately.
        let ext = if ix % 2 == 0 { "nnef.tgz" } else { "nnef.tar" };
        let out = dir.path().join(format!("{stem}.{ext}"));
        let converted = engine::convert(&crate::model(&format!("{stem}.onnx")), &LoadOptions::default(), &out)
            .unwrap_or_else(|e| panic!("{stem}: {e}"));
        assert!(converted.size_bytes > 0 && out.is_file());
        // What the daemon does with the file: a fresh load.
        let model = Model::load(&out, &LoadOptions::default()).unwrap();
        assert_eq!(model.info().origin, Origin::Converted);
        assert_eq!(model.info().name, stem);
        assert_same_model(&onnx, &model);
        let diff = max_output_diff(&onnx, &model, &ref_inputs(stem, &onnx));
        eprintln!("{stem} ({ext}, {} bytes): max |converted - onnx| = {diff:.3e}", converted.size_bytes);
        assert_eq!(diff, 0.0, "{stem}: the converted model must compute what the ONNX model computes");
        parity::check_loaded(stem, &tol, &model);
    }
}

#[test]
fn converted_audio_models_match_onnx() {
    // No ONNX Runtime reference tensors for these: compared with the ONNX model on deterministic inputs.
    let dir = tempfile::tempdir().unwrap();
    let mut seq = LoadOptions::default();
    seq.input_shapes.insert("input".into(), vec![4, 576]);
    for (stem, opts) in [("silero_vad_window16k", LoadOptions::default()), ("silero_vad_16k_sequence", seq)] {
        let src = crate::model(&format!("{stem}.onnx"));
        let onnx = Model::load(&src, &opts).unwrap();
        let out = dir.path().join(format!("{stem}.nnef.tgz"));
        let model = engine::convert(&src, &opts, &out).unwrap_or_else(|e| panic!("{stem}: {e}")).model;
        assert_same_model(&onnx, &model);
        let diff = max_output_diff(&onnx, &model, &synthetic_inputs(&onnx));
        eprintln!("{stem}: max |converted - onnx| = {diff:.3e}");
        assert_eq!(diff, 0.0, "{stem}");
    }
}

#[test]
fn converted_models_keep_their_pinned_shapes_and_path() {
    let dir = tempfile::tempdir().unwrap();
    let src = crate::model("digits_cnn_dynamic.onnx");
    let mut opts = LoadOptions::default();
    opts.input_shapes.insert("image".into(), vec![1, 3, 40, 48]);
    let out = dir.path().join("d.nnef.tar");
    let c = engine::convert(&src, &opts, &out).unwrap();
    assert_eq!(c.model.inputs()[0].shape, vec![1, 3, 40, 48]);
    assert!(c.model.info().value_info_ignored, "the ONNX load's facts travel with the file");
    assert_eq!(c.model.info().onnx_path, src);

    // Loading with the same shape, or none, is fine; another shape or path says to convert again.
    assert!(Model::load(&out, &opts).is_ok());
    let mut other = LoadOptions::default();
    other.input_shapes.insert("image".into(), vec![1, 3, 32, 32]);
    let e = Model::load(&out, &other).unwrap_err().to_string();
    assert!(e.contains("`image`") && e.contains("[1, 3, 40, 48]") && e.contains("convert"), "{e}");

    let q = dir.path().join("q.nnef.tgz");
    engine::convert(&crate::model("vibration_int8.onnx"), &LoadOptions::default(), &q).unwrap();
    let e = Model::load(&q, &LoadOptions { qdq_as_float: true, ..Default::default() }).unwrap_err().to_string();
    assert!(e.contains("qdq-as-float"), "{e}");
    let f = dir.path().join("f.nnef.tgz");
    let float_path = LoadOptions { qdq_as_float: true, ..Default::default() };
    let c = engine::convert(&crate::model("vibration_int8.onnx"), &float_path, &f).unwrap();
    assert!(c.model.info().int8_path.starts_with("float (QDQ"), "{}", c.model.info().int8_path);

    // Bad output names, a converted input, foreign and damaged archives: errors naming the file.
    let e = engine::convert(&src, &opts, &dir.path().join("d.onnx")).unwrap_err().to_string();
    assert!(e.contains(".nnef.tgz"), "{e}");
    let e = engine::convert(&out, &opts, &dir.path().join("again.nnef.tgz")).unwrap_err().to_string();
    assert!(e.contains("already a converted model"), "{e}");
    let damaged = dir.path().join("damaged.nnef.tgz");
    let bytes = std::fs::read(&q).unwrap();
    std::fs::write(&damaged, &bytes[..bytes.len() / 2]).unwrap();
    let e = Model::load(&damaged, &LoadOptions::default()).unwrap_err().to_string();
    assert!(e.contains("damaged.nnef.tgz") && e.contains("converted model"), "{e}");
    let foreign = dir.path().join("foreign.nnef.tar");
    let mut ar = tar::Builder::new(std::fs::File::create(&foreign).unwrap());
    let mut h = tar::Header::new_gnu();
    h.set_size(3);
    h.set_cksum();
    ar.append_data(&mut h, "graph.nnef", &b"abc"[..]).unwrap();
    ar.finish().unwrap();
    let e = Model::load(&foreign, &LoadOptions::default()).unwrap_err().to_string();
    assert!(e.contains("edgeinfer.json"), "{e}");
}

fn entries(dir: &Path) -> Vec<PathBuf> {
    let mut v: Vec<PathBuf> =
        std::fs::read_dir(dir).map(|rd| rd.map(|e| e.unwrap().path()).collect()).unwrap_or_default();
    v.sort();
    v
}

/// ONNX metadata is free text: YOLO exports keep their class names as a Python
/// dict (`{0: 'person', ...}`), which tract's NNEF reader could not read back,
/// so the cache entry was written on every start and never hit.
#[test]
#[cfg(feature = "onnx")]
fn a_model_with_quotes_in_its_metadata_is_cached_and_hit() {
    use prost::Message;
    use tract_onnx::prelude::Framework;
    let dir = tempfile::tempdir().unwrap();
    let src = crate::model("vibration_f32.onnx");
    let mut proto = tract_onnx::onnx().proto_model_for_path(&src).unwrap();
    for (key, value) in [("names", "{0: 'normal', 1: \"imbalance\"}"), ("author", "O'Brien \\ co")] {
        proto.metadata_props.push(tract_onnx::pb::StringStringEntryProto { key: key.into(), value: value.into() });
    }
    let model = dir.path().join("with_metadata.onnx");
    std::fs::write(&model, proto.encode_to_vec()).unwrap();
    let opts = LoadOptions { cache_dir: Some(dir.path().join("cache")), ..Default::default() };
    let cold = Model::load(&model, &opts).unwrap();
    assert!(cold.info().cache.as_deref().unwrap().starts_with("miss; written"), "{:?}", cold.info().cache);
    let warm = Model::load(&model, &opts).unwrap();
    assert_eq!(warm.info().origin, Origin::Cache, "{:?}", warm.info().cache);
    let inputs = ref_inputs("vibration_f32", &cold);
    assert_eq!(max_output_diff(&cold, &warm, &inputs), 0.0);
}

#[test]
fn startup_cache_misses_then_hits_and_survives_damage() {
    let cache = tempfile::tempdir().unwrap();
    let dir = cache.path().join("sub"); // created on first write
    let opts = LoadOptions { cache_dir: Some(dir.clone()), ..Default::default() };
    let src = crate::model("vibration_int8.onnx");
    let plain = Model::load(&src, &LoadOptions::default()).unwrap();
    assert_eq!((plain.info().origin, plain.info().cache.as_deref()), (Origin::Onnx, None));
    let inputs = ref_inputs("vibration_int8", &plain);

    let cold = Model::load(&src, &opts).unwrap();
    assert_eq!(cold.info().origin, Origin::Onnx);
    assert!(cold.info().cache.as_deref().unwrap().starts_with("miss; written"), "{:?}", cold.info().cache);
    let files = entries(&dir);
    assert_eq!(files.len(), 1, "{files:?}");
    let entry = files[0].clone();
    assert!(entry.file_name().unwrap().to_str().unwrap().starts_with("vibration_int8-"));

    let warm = Model::load(&src, &opts).unwrap();
    assert_eq!(warm.info().origin, Origin::Cache);
    assert!(warm.info().cache.as_deref().unwrap().starts_with("hit"), "{:?}", warm.info().cache);
    assert_eq!(warm.info().path, src);
    assert_same_model(&plain, &warm);
    assert_eq!(max_output_diff(&plain, &warm, &inputs), 0.0);

    // Damaged entries: truncated, garbage, or another model's under this name. Each is
    // ignored (logged), the ONNX file loads, and a good entry replaces it.
    let good = std::fs::read(&entry).unwrap();
    let digits = Model::load(&crate::model("digits_cnn_f32.onnx"), &opts).unwrap();
    assert_eq!(digits.info().origin, Origin::Onnx);
    let digits_entry = entries(&dir).into_iter().find(|p| p != &entry).unwrap();
    let damages: Vec<(&str, Vec<u8>)> = vec![
        ("truncated", good[..good.len() / 3].to_vec()),
        ("garbage", b"not a tar archive at all".to_vec()),
        ("empty", Vec::new()),
        ("another model", std::fs::read(&digits_entry).unwrap()),
    ];
    for (what, bytes) in damages {
        std::fs::write(&entry, bytes).unwrap();
        let m = Model::load(&src, &opts).unwrap_or_else(|e| panic!("{what}: {e}"));
        assert_eq!(m.info().origin, Origin::Onnx, "{what}");
        let note = m.info().cache.as_deref().unwrap();
        assert!(note.contains("unusable entry ignored") && note.contains("written"), "{what}: {note}");
        assert_eq!(max_output_diff(&plain, &m, &inputs), 0.0, "{what}");
        assert_eq!(Model::load(&src, &opts).unwrap().info().origin, Origin::Cache, "{what}: rewritten");
    }

    // Other options, other entries; threads and warm-up share one.
    let before = entries(&dir).len();
    let float = LoadOptions { qdq_as_float: true, ..opts.clone() };
    assert_eq!(Model::load(&src, &float).unwrap().info().origin, Origin::Onnx);
    assert_eq!(Model::load(&src, &float).unwrap().info().origin, Origin::Cache);
    assert!(Model::load(&src, &float).unwrap().info().int8_path.starts_with("float (QDQ"));
    let threads = LoadOptions { threads: 2, skip_warmup: true, ..opts.clone() };
    assert_eq!(Model::load(&src, &threads).unwrap().info().origin, Origin::Cache);
    assert_eq!(entries(&dir).len(), before + 1);
    // No temporary files left behind.
    assert!(entries(&dir).iter().all(|p| p.extension().unwrap() == "tar"), "{:?}", entries(&dir));
}

#[test]
fn dynamically_quantized_models_are_converted_and_cached() {
    // Their DynamicQuantizeLinear -> ConvInteger chains load as our own rounding
    // op and float products, which have NNEF forms (tract's own DynamicQuantizeLinear has none).
    let dir = tempfile::tempdir().unwrap();
    for stem in ["breast_cancer_mlp_dynint8", "digits_cnn_dynint8"] {
        let tol = if stem.starts_with("digits") { parity::DYNAMIC } else { FLOAT };
        let src = crate::model(&format!("{stem}.onnx"));
        let out = dir.path().join(format!("{stem}.nnef.tgz"));
        engine::convert(&src, &LoadOptions::default(), &out).unwrap();
        let converted = Model::load(&out, &LoadOptions::default()).unwrap();
        assert!(converted.info().int8_path.contains("EdgeinferDynamicQuantDequant"), "{}", converted.info().int8_path);
        parity::check_loaded(stem, &tol, &converted);
        let cache = dir.path().join("cache");
        let opts = LoadOptions { cache_dir: Some(cache), ..Default::default() };
        let origins: Vec<Origin> = (0..2)
            .map(|_| {
                let m = Model::load(&src, &opts).unwrap();
                parity::check_loaded(stem, &tol, &m);
                m.info().origin
            })
            .collect();
        assert_eq!(origins, [Origin::Onnx, Origin::Cache], "{stem}");
    }
}

#[test]
fn an_unwritable_cache_only_costs_a_warning() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("a-file");
    std::fs::write(&file, b"").unwrap();
    let opts = LoadOptions { cache_dir: Some(file.join("cache")), ..Default::default() };
    let m = Model::load(&crate::model("vibration_f32.onnx"), &opts).unwrap();
    assert_eq!(m.info().origin, Origin::Onnx);
    assert!(m.info().cache.as_deref().unwrap().starts_with("miss; not written"), "{:?}", m.info().cache);
}

fn pool_threads() -> usize {
    std::fs::read_dir("/proc/self/task")
        .map(|rd| {
            rd.filter_map(|t| std::fs::read_to_string(t.ok()?.path().join("comm")).ok())
                .filter(|c| c.starts_with("tract-"))
                .count()
        })
        .unwrap_or(0)
}

#[test]
fn threads_start_a_pool_and_keep_the_results() {
    let src = crate::model("mobilenetv2_int8.onnx");
    let one = Model::load(&src, &LoadOptions::default()).unwrap();
    assert_eq!(one.info().threads, 1);
    let before = pool_threads();
    let two = Model::load(&src, &LoadOptions { threads: 2, ..Default::default() }).unwrap();
    assert_eq!(two.info().threads, 2);
    assert!(pool_threads() >= before + 2, "no tract pool threads: {before} -> {}", pool_threads());
    let diff = max_output_diff(&one, &two, &ref_inputs("mobilenetv2_int8", &one));
    assert_eq!(diff, 0.0, "splitting matrix products between threads must not change results");
    parity::check_loaded("mobilenetv2_int8", &parity::int8(6.0), &two);
}

fn run_cli(args: &[&str]) -> std::process::Output {
    edgeinfer().args(args).env("RUST_LOG", "warn").output().expect("binary runs")
}

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

#[test]
fn convert_cli_output_runs_in_infer_inspect_and_bench() {
    let dir = tempfile::tempdir().unwrap();
    let src = crate::model("vibration_int8.onnx");
    let out = dir.path().join("vib.nnef.tgz");
    let r = run_cli(&["convert", s(&src), "-o", s(&out), "--json"]);
    assert!(r.status.success(), "{}", String::from_utf8_lossy(&r.stderr));
    let v: serde_json::Value = serde_json::from_slice(&r.stdout).unwrap();
    assert_eq!(v["output"], s(&out));
    assert_eq!(v["size_bytes"].as_u64().unwrap(), std::fs::metadata(&out).unwrap().len());
    assert_eq!(v["inputs"][0]["name"], "window");

    // infer: the same tensors as from the ONNX file.
    let refs = crate::root().join("models/ref/vibration_int8/in0.npy");
    for (m, save) in [(&src, "a"), (&out, "b")] {
        let r = run_cli(&["infer", s(m), "--npy", s(&refs), "--save-npy", s(&dir.path().join(save))]);
        assert!(r.status.success(), "{}", String::from_utf8_lossy(&r.stderr));
    }
    let a = Tensor::read_npy(&dir.path().join("a/out0.npy")).unwrap();
    let b = Tensor::read_npy(&dir.path().join("b/out0.npy")).unwrap();
    assert_eq!(a, b);

    // inspect: converted, same identity.
    let i = |m: &Path| -> serde_json::Value {
        let r = run_cli(&["inspect", s(m), "--json"]);
        assert!(r.status.success(), "{}", String::from_utf8_lossy(&r.stderr));
        serde_json::from_slice(&r.stdout).unwrap()
    };
    let (vi, vo) = (i(&out), i(&src));
    assert_eq!((vi["origin"].as_str(), vo["origin"].as_str()), (Some("converted"), Some("onnx")));
    assert_eq!(vi["sha256"], vo["sha256"]);
    assert_eq!(vi["inputs"], vo["inputs"]);
    assert_eq!(vi["model"], "vib");
    let text = run_cli(&["inspect", s(&out)]);
    assert!(String::from_utf8_lossy(&text.stdout).contains("(converted)"));

    // bench on the converted file, with threads.
    let r = run_cli(&["bench", s(&out), "--runs", "5", "--warmup", "1", "--threads", "2", "--json"]);
    assert!(r.status.success(), "{}", String::from_utf8_lossy(&r.stderr));
    let v: serde_json::Value = serde_json::from_slice(&r.stdout).unwrap();
    assert_eq!((v["origin"].as_str(), v["threads"].as_u64()), (Some("converted"), Some(2)));
    assert!(v["startup_ms"].as_f64().unwrap() >= v["init_ms"].as_f64().unwrap());

    // Errors are one line naming the file.
    let r = run_cli(&["convert", s(&src), "-o", s(&dir.path().join("x.zip"))]);
    let err = String::from_utf8_lossy(&r.stderr);
    assert_eq!((r.status.code(), err.trim().lines().count()), (Some(2), 1), "{err}");
    assert!(err.contains("x.zip") && err.contains(".nnef.tgz"), "{err}");
    let r = run_cli(&["bench", s(&src), "--threads", "0"]);
    assert_eq!(r.status.code(), Some(2));
}

#[test]
fn bench_with_a_cache_dir_reports_cold_then_cached_start() {
    let dir = tempfile::tempdir().unwrap();
    let src = crate::model("digits_cnn_int8.onnx");
    let bench = || -> serde_json::Value {
        let r = run_cli(&["bench", s(&src), "--runs", "3", "--warmup", "1", "--cache-dir", s(dir.path()), "--json"]);
        assert!(r.status.success(), "{}", String::from_utf8_lossy(&r.stderr));
        serde_json::from_slice(&r.stdout).unwrap()
    };
    let (cold, cached) = (bench(), bench());
    assert_eq!(cold["origin"], "onnx");
    assert!(cold["cache"].as_str().unwrap().starts_with("miss; written"), "{cold}");
    assert_eq!(cached["origin"], "cache");
    assert!(cached["cache"].as_str().unwrap().starts_with("hit"), "{cached}");
}

#[test]
fn daemon_runs_a_converted_model_and_a_cached_one() {
    let work = tempfile::tempdir().unwrap();
    let converted = work.path().join("vibration_int8.nnef.tgz");
    engine::convert(&crate::model("vibration_int8.onnx"), &LoadOptions::default(), &converted).unwrap();
    let cache = work.path().join("cache");
    let port = free_port();
    let config = format!(
        r#"
device = "conv"
[broker]
listen = "127.0.0.1:{port}"
[engine]
cache_dir = "{cache}"
threads = 2
[[pipelines]]
name = "converted"
model = "{converted}"
labels = "{{models}}/vibration.labels.txt"
threads = 1
source = {{ type = "synthetic", signal = "vibration", rate_hz = 1000 }}
[[pipelines]]
name = "cached"
model = "{{models}}/vibration_int8.onnx"
source = {{ type = "synthetic", signal = "vibration", rate_hz = 1000 }}
"#,
        cache = cache.display(),
        converted = converted.display(),
    );
    // `check` loads both (writing the cache entry); `run` then starts from the cache.
    let cfg_path = work.path().join("app.toml");
    std::fs::write(&cfg_path, config.replace("{models}", s(&crate::root().join("models")))).unwrap();
    let r = run_cli(&["check", s(&cfg_path)]);
    assert!(r.status.success(), "{}", String::from_utf8_lossy(&r.stderr));
    let written = entries(&cache);
    assert_eq!(written.len(), 1, "{written:?}");
    let inode = |p: &Path| std::os::unix::fs::MetadataExt::ino(&std::fs::metadata(p).unwrap());
    let before = inode(&written[0]);

    let mut daemon = Daemon::start(&config);
    let long = Duration::from_secs(30);
    assert!(wait_port(port, long), "no broker; stderr: {}", daemon.stderr());
    let mut sub = Subscriber::connect(port, "edgeinfer/conv/#");
    for p in ["converted", "cached"] {
        let topic = format!("edgeinfer/conv/{p}/result");
        let got = sub.collect(2, long, |m| m.topic == topic);
        assert_eq!(got.len(), 2, "{p}: stderr: {}", daemon.stderr());
        let v = got[0].json();
        assert_eq!(v["result"]["classes"].as_array().unwrap().len(), 3, "{v}");
        let onnx = Model::load(&crate::model("vibration_int8.onnx"), &LoadOptions::default()).unwrap();
        assert_eq!(v["model"]["sha256"], onnx.info().sha256.as_str(), "{p}: same identity");
    }
    daemon.signal("TERM");
    assert_eq!(daemon.wait(long), Some(0), "stderr: {}", daemon.stderr());
    // A miss would have replaced the file (a new inode through the rename).
    assert_eq!(entries(&cache), written);
    assert_eq!(inode(&written[0]), before, "the daemon hit the entry `check` wrote");
}
