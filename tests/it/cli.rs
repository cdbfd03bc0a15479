//! The real `edgeinfer` binary on the shipped models: clear one-line errors,
//! raw tensor mode, image and batch inference, inspect and bench output.

use std::process::{Command, Output};

use edgeinfer::tensor::{Data, Tensor};

fn edgeinfer(args: &[&str]) -> Output {
    edgeinfer_with(args, &[])
}

/// [`edgeinfer`] with environment variables set.
fn edgeinfer_with(args: &[&str], env: &[(&str, &str)]) -> Output {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_edgeinfer"));
    cmd.args(args).env("RUST_LOG", "warn").env_remove("EDGEINFER_ISA");
    cmd.envs(env.iter().copied()).output().expect("binary runs")
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

fn path(p: &std::path::Path) -> &str {
    p.to_str().unwrap()
}

#[test]
fn unsupported_operator_is_one_clear_line() {
    let m = crate::model("unsupported_op.onnx");
    let out = edgeinfer(&["inspect", path(&m)]);
    assert_eq!(out.status.code(), Some(2));
    let err = text(&out.stderr);
    assert_eq!(err.trim().lines().count(), 1, "{err}");
    for part in ["FancyOp", "fancy_node", "unsupported_op.onnx"] {
        assert!(err.contains(part), "`{part}` missing from: {err}");
    }
    assert!(!err.contains("panicked"), "{err}");
}

#[test]
fn corrupt_and_missing_files_are_one_clear_line() {
    let dir = tempfile::tempdir().unwrap();
    let empty = dir.path().join("empty.onnx");
    std::fs::write(&empty, b"").unwrap();
    let garbage = dir.path().join("garbage.onnx");
    std::fs::write(&garbage, b"this is not protobuf \xff\xff\xff\xff").unwrap();
    let corrupt = crate::model("corrupt.onnx");
    let missing = dir.path().join("missing.onnx");
    for (m, expect) in [
        (corrupt.as_path(), "not a valid ONNX model"),
        (empty.as_path(), "not a valid ONNX model"),
        (garbage.as_path(), "not a valid ONNX model"),
        (missing.as_path(), "cannot read model"),
    ] {
        for cmd in ["inspect", "bench", "infer"] {
            let out = edgeinfer(&[cmd, path(m), "[1]"][..if cmd == "infer" { 3 } else { 2 }]);
            let err = text(&out.stderr);
            assert_eq!(out.status.code(), Some(2), "{cmd} {m:?}: {err}");
            assert_eq!(err.trim().lines().count(), 1, "{cmd} {m:?}: {err}");
            assert!(err.contains(expect) && err.contains(m.file_name().unwrap().to_str().unwrap()), "{cmd}: {err}");
            assert!(!err.contains("panicked"), "{err}");
        }
    }
}

#[test]
fn raw_mode_feeds_multiple_inputs_and_saves_every_output() {
    let dir = tempfile::tempdir().unwrap();
    let refs = crate::root().join("models/ref/multi_io");
    let out = edgeinfer(&[
        "infer",
        path(&crate::model("multi_io.onnx")),
        "--npy",
        path(&refs.join("in0.npy")),
        "--npy",
        path(&refs.join("in1.npy")),
        "--save-npy",
        path(dir.path()),
    ]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    for ix in 0..2 {
        let got = Tensor::read_npy(&dir.path().join(format!("out{ix}.npy"))).unwrap();
        let want = Tensor::read_npy(&refs.join(format!("out{ix}.npy"))).unwrap();
        assert_eq!(got.shape, want.shape);
        let diff =
            got.data.to_f64_vec().iter().zip(want.data.to_f64_vec()).map(|(a, b)| (a - b).abs()).fold(0.0, f64::max);
        assert!(diff < 1e-5, "out{ix}: {diff}");
    }
    let line: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(line["outputs"][1]["name"], "ratio");
}

#[test]
fn raw_mode_keeps_output_element_types() {
    let dir = tempfile::tempdir().unwrap();
    let refs = crate::root().join("models/ref/breast_cancer_trees");
    let out = edgeinfer(&[
        "infer",
        path(&crate::model("breast_cancer_trees.onnx")),
        "--npy",
        path(&refs.join("in0.npy")),
        "--save-npy",
        path(dir.path()),
    ]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let label = Tensor::read_npy(&dir.path().join("out0.npy")).unwrap();
    assert_eq!(label, Tensor::read_npy(&refs.join("out0.npy")).unwrap());
    assert!(matches!(label.data, Data::I64(_)));
}

#[test]
fn raw_mode_rejects_wrong_count_type_and_shape_naming_the_input() {
    let dir = tempfile::tempdir().unwrap();
    let m = crate::model("multi_io.onnx");
    let refs = crate::root().join("models/ref/multi_io");
    let out = edgeinfer(&["infer", path(&m), "--npy", path(&refs.join("in0.npy"))]);
    assert_eq!(out.status.code(), Some(2));
    assert!(text(&out.stderr).contains("2 input(s)"), "{}", text(&out.stderr));

    let f64_file = dir.path().join("a64.npy");
    Tensor::new(vec![1, 4], Data::F64(vec![1.0; 4])).unwrap().write_npy(&f64_file).unwrap();
    let out = edgeinfer(&["infer", path(&m), "--npy", path(&f64_file), "--npy", path(&refs.join("in1.npy"))]);
    let err = text(&out.stderr);
    assert!(out.status.code() == Some(2) && err.contains("`a`") && err.contains("f64"), "{err}");

    let wrong_shape = dir.path().join("a5.npy");
    Tensor::from_f32(vec![1, 5], vec![1.0; 5]).unwrap().write_npy(&wrong_shape).unwrap();
    let out = edgeinfer(&["infer", path(&m), "--npy", path(&wrong_shape), "--npy", path(&refs.join("in1.npy"))]);
    let err = text(&out.stderr);
    assert!(out.status.code() == Some(2) && err.contains("`a`") && err.contains("[1, 4]"), "{err}");
}

#[test]
fn raw_mode_pins_symbolic_dimensions_from_the_arrays() {
    // The dynamic-axes copy of the digits CNN ([batch, 3, height, width]),
    // same weights as digits_cnn_f32: its reference array runs as it is.
    let dir = tempfile::tempdir().unwrap();
    let m = crate::model("digits_cnn_dynamic.onnx");
    let refs = crate::root().join("models/ref/digits_cnn_f32");
    let out = edgeinfer(&["infer", path(&m), "--npy", path(&refs.join("in0.npy")), "--save-npy", path(dir.path())]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let got = Tensor::read_npy(&dir.path().join("out0.npy")).unwrap();
    let want = Tensor::read_npy(&refs.join("out0.npy")).unwrap();
    assert_eq!(got.shape, want.shape);
    let diff = got.data.to_f64_vec().iter().zip(want.data.to_f64_vec()).map(|(a, b)| (a - b).abs()).fold(0.0, f64::max);
    assert!(diff < 1e-3, "max diff {diff}");

    // A batch of two at another size: the batch comes from the array too.
    let two = dir.path().join("two.npy");
    Tensor::from_f32(vec![2, 3, 40, 48], vec![0.5; 2 * 3 * 40 * 48]).unwrap().write_npy(&two).unwrap();
    let out = edgeinfer(&["infer", path(&m), "--npy", path(&two)]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let line: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(line["outputs"][0]["shape"], serde_json::json!([2, 10]));

    // A fixed dimension the array does not match (1 channel, not 3) is named.
    let gray = dir.path().join("gray.npy");
    Tensor::from_f32(vec![1, 1, 32, 32], vec![0.5; 32 * 32]).unwrap().write_npy(&gray).unwrap();
    let out = edgeinfer(&["infer", path(&m), "--npy", path(&gray)]);
    let err = text(&out.stderr);
    assert!(!out.status.success() && err.contains("`image`") && err.contains("dimension 1"), "{err}");
}

#[test]
fn png_gives_the_same_scores_as_the_reference_tensor() {
    let m = crate::model("digits_cnn_int8.onnx");
    let refs = crate::root().join("models/ref/digits_cnn_int8");
    let from_png = edgeinfer(&["infer", path(&m), path(&refs.join("digit.png")), "--top-k", "3"]);
    let from_npy = edgeinfer(&["infer", path(&m), path(&refs.join("in0.npy")), "--top-k", "3"]);
    assert!(from_png.status.success(), "{}", text(&from_png.stderr));
    let a: serde_json::Value = serde_json::from_slice(&from_png.stdout).unwrap();
    let b: serde_json::Value = serde_json::from_slice(&from_npy.stdout).unwrap();
    assert_eq!(a["top"], b["top"]);
    assert_eq!(a["top"][0]["label"], "2", "{a}");
    assert_eq!(a["top"].as_array().unwrap().len(), 3);
}

#[test]
fn batch_directory_reports_bad_files_and_goes_on() {
    let dir = tempfile::tempdir().unwrap();
    let samples = crate::root().join("models/samples/digits");
    let mut good = 0;
    for entry in std::fs::read_dir(&samples).unwrap() {
        let p = entry.unwrap().path();
        std::fs::copy(&p, dir.path().join(p.file_name().unwrap())).unwrap();
        good += 1;
    }
    std::fs::write(dir.path().join("broken.png"), b"\x89PNG\r\n\x1a\n truncated").unwrap();
    std::fs::write(dir.path().join("notes.txt"), b"hello").unwrap();
    let out = edgeinfer(&["infer", path(&crate::model("digits_cnn_f32.onnx")), path(dir.path())]);
    assert_eq!(out.status.code(), Some(1), "some inputs failed");
    let lines: Vec<serde_json::Value> = text(&out.stdout).lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    assert_eq!(lines.len(), good);
    for line in &lines {
        let file = line["input"].as_str().unwrap();
        // sample files are named digit_<label>_<i>.png
        let label = file.rsplit('/').next().unwrap().split('_').nth(1).unwrap();
        assert_eq!(line["top"][0]["label"], label, "{line}");
    }
    let err = text(&out.stderr);
    assert!(err.contains("broken.png") && err.contains("notes.txt"), "{err}");
    assert!(err.contains(&format!("{} inputs: {good} ok, 2 failed", good + 2)), "{err}");
}

#[test]
fn json_array_input_runs_the_tabular_model() {
    let refs = crate::root().join("models/ref/breast_cancer_trees");
    let x = Tensor::read_npy(&refs.join("in0.npy")).unwrap();
    let literal = serde_json::to_string(&x.to_json()[0]).unwrap();
    let out = edgeinfer(&["infer", path(&crate::model("breast_cancer_trees.onnx")), &literal]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["top"][0]["label"], "benign", "{v}");
    let bad = edgeinfer(&["infer", path(&crate::model("breast_cancer_trees.onnx")), "[1, 2, 3]"]);
    assert_eq!(bad.status.code(), Some(1));
    assert!(text(&bad.stderr).contains("30 values"), "{}", text(&bad.stderr));
}

#[test]
fn inspect_json_describes_io_quantization_and_rewrites() {
    let out = edgeinfer(&["inspect", path(&crate::model("digits_cnn_int8_qop.onnx")), "--json"]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["quantization"], "QOperator");
    assert_eq!(v["inputs"][0]["name"], "image");
    assert_eq!(v["inputs"][0]["shape"], serde_json::json!([1, 3, 32, 32]));
    assert_eq!(v["outputs"][0]["type"], "f32");
    assert!(v["outputs"][0]["quantization"]["scale"].as_f64().unwrap() > 0.0);
    assert_eq!(v["op_counts"]["com.microsoft:QLinearAdd"], 1);
    assert!(v["rewrites"].as_array().unwrap().iter().any(|r| r.as_str().unwrap().starts_with("QLinearAdd")));
    assert!(v["timings_ms"]["optimize_ms"].as_f64().unwrap() > 0.0);
}

#[test]
fn inspect_says_where_depthwise_convolutions_run() {
    let out = edgeinfer(&["inspect", path(&crate::model("mobilenetv2_int8.onnx"))]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let stdout = text(&out.stdout);
    let line = stdout.lines().find(|l| l.starts_with("depthwise    ")).unwrap_or_else(|| panic!("{stdout}"));
    // "depthwise    N convolutions on edgeinfer's kernels (3x3, 5x5), M on tract's": MobileNetV2 has 17.
    let numbers: Vec<usize> = line.split_whitespace().filter_map(|w| w.parse().ok()).collect();
    assert_eq!(numbers.len(), 2, "{line}");
    assert_eq!(numbers[0] + numbers[1], 17, "{line}");
    // A model without depthwise convolutions has no such line.
    let out = edgeinfer(&["inspect", path(&crate::model("digits_cnn_f32.onnx"))]);
    assert!(!text(&out.stdout).contains("depthwise"), "{}", text(&out.stdout));
}

#[test]
fn inspect_says_which_int8_convolutions_run_on_integer_kernels() {
    use edgeinfer::engine::isa::Isa;
    let mobilenet = crate::model("mobilenetv2_int8.onnx");
    // Every rung this CPU has, named with EDGEINFER_ISA (which runs its
    // kernels even where they are not the default): the scalar one keeps tract's.
    for isa in Isa::available() {
        let out = edgeinfer_with(&["inspect", path(&mobilenet)], &[("EDGEINFER_ISA", isa.name())]);
        assert!(out.status.success(), "{}", text(&out.stderr));
        let stdout = text(&out.stdout);
        let line = stdout.lines().find(|l| l.starts_with("int8 convs   "));
        let kernels = stdout.lines().find(|l| l.starts_with("kernels ")).unwrap_or_else(|| panic!("{stdout}"));
        if isa != Isa::Scalar {
            // Its 35 non-depthwise convolutions and its classifier.
            let line = line.unwrap_or_else(|| panic!("{stdout}"));
            let want = format!("int8 convs   36 convolutions on edgeinfer's integer kernels ({})", isa.describe());
            assert_eq!(line, want);
            assert!(kernels.ends_with(&format!("; 36 convolutions on integer kernels ({})", isa.describe())));
        } else {
            assert!(line.is_none() && !kernels.contains("integer kernels"), "{stdout}");
        }
    }
    // A cap that names no instruction set stops the load with a line that says so.
    let out = edgeinfer_with(&["inspect", path(&mobilenet)], &[("EDGEINFER_ISA", "sse9")]);
    assert!(!out.status.success());
    assert!(text(&out.stderr).contains("EDGEINFER_ISA=sse9 is not an instruction set"), "{}", text(&out.stderr));
    // A float model never has the line.
    let out = edgeinfer(&["inspect", path(&crate::model("digits_cnn_f32.onnx"))]);
    assert!(!text(&out.stdout).contains("int8 convs"), "{}", text(&out.stdout));
}

#[test]
fn inspect_says_which_float_1x1_convolutions_run_on_our_kernel() {
    #[cfg(target_arch = "x86_64")]
    let avx512 = std::arch::is_x86_feature_detected!("avx512f") && std::arch::is_x86_feature_detected!("fma");
    #[cfg(not(target_arch = "x86_64"))]
    let avx512 = false;
    let line_of = |model: &str, extra: &[&str]| {
        let mut args = vec!["inspect", model];
        args.extend_from_slice(extra);
        // On the scalar rung, int8 models keep tract's (and this) float kernels.
        let out = edgeinfer_with(&args, &[("EDGEINFER_ISA", "scalar")]);
        assert!(out.status.success(), "{}", text(&out.stderr));
        text(&out.stdout).lines().find(|l| l.starts_with("1x1 convs    ")).map(str::to_string)
    };
    // The detector (fetched by models/fetch_detector.py) has 54 1x1 convolutions.
    let detector = crate::model("detector_yolov8n.onnx");
    if std::path::Path::new(&detector).exists() {
        let line = line_of(path(&detector), &["--input-shape", "images=1,3,160,160"]);
        if avx512 {
            let line = line.expect("a 1x1 convs line");
            assert_eq!(line, "1x1 convs    54 float convolutions on edgeinfer's 1x1 kernel (AVX-512)");
        } else {
            assert!(line.is_none(), "{line:?}");
        }
    }
    // The int8 MobileNetV2's 34 go to the integer kernels when they run
    // (x86 CPUs with VNNI), else to this one; capped to the scalar rung here.
    let line = line_of(path(&crate::model("mobilenetv2_int8.onnx")), &[]);
    if avx512 {
        assert_eq!(line.as_deref(), Some("1x1 convs    34 float convolutions on edgeinfer's 1x1 kernel (AVX-512)"));
    } else {
        assert!(line.is_none(), "{line:?}");
    }
    // digits has no 1x1 convolution.
    assert!(line_of(path(&crate::model("digits_cnn_f32.onnx")), &[]).is_none());
}

#[test]
fn inspect_describes_symbolic_dimensions_by_name_without_a_shape() {
    let m = crate::model("digits_cnn_dynamic.onnx");
    let out = edgeinfer(&["inspect", path(&m)]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let stdout = text(&out.stdout);
    for line in [
        "quantization float (not quantized)",
        "  image            f32 [batch, 3, height, width]",
        "  logits           f32 [batch, 10]",
        "operators    18 nodes: Add 1, Conv 7, Flatten 1, Gemm 1, GlobalAveragePool 1, Relu 7",
        "to pin       image: height (dim 2), width (dim 3); batch (dim 0) = 1 (--batch)",
        "example      --input-shape image=1,3,HEIGHT,WIDTH",
        "             input_shape = [1, 3, HEIGHT, WIDTH]  (in a pipeline's config)",
        "             HEIGHT, WIDTH: the sizes to run at",
    ] {
        assert!(stdout.lines().any(|l| l == line), "`{line}` missing from:\n{stdout}");
    }
    // Nothing was optimised, so nothing about the plan is claimed.
    for absent in ["kernels ", "optimized ", "load "] {
        assert!(!stdout.lines().any(|l| l.starts_with(absent)), "`{absent}` in:\n{stdout}");
    }

    let out = edgeinfer(&["inspect", path(&m), "--json", "--batch", "4"]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["pinned"], false);
    assert_eq!(v["inputs"][0]["name"], "image");
    assert_eq!(v["inputs"][0]["type"], "f32");
    assert_eq!(v["inputs"][0]["shape"], serde_json::json!(["batch", 3, "height", "width"]));
    assert_eq!(v["outputs"][0]["shape"], serde_json::json!(["batch", 10]));
    assert_eq!(v["outputs_analysed"], true);
    assert!(v["inputs"][0].get("declared_shape").is_none(), "`shape` is the declaration: {v}");
    assert_eq!(v["opset"], 17);
    assert_eq!(v["op_counts"]["Conv"], 7);
    assert_eq!(
        v["symbolic_dims"],
        serde_json::json!([
            {"input": "image", "axis": 0, "name": "batch", "size": 4},
            {"input": "image", "axis": 2, "name": "height", "size": null},
            {"input": "image", "axis": 3, "name": "width", "size": null},
        ])
    );
    assert_eq!(v["pin_example"]["cli"], "--input-shape image=4,3,HEIGHT,WIDTH");
    assert_eq!(v["pin_example"]["config"], "input_shape = [4, 3, HEIGHT, WIDTH]");
    for absent in ["int8_path", "optimized_nodes", "optimized_ops", "timings_ms"] {
        assert!(v.get(absent).is_none(), "{absent}: {v}");
    }

    // A shape for an input the model lacks is still an error, named.
    let out = edgeinfer(&["inspect", path(&m), "--input-shape", "img=1,3,32,32"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(text(&out.stderr).contains("`img`: no such input"), "{}", text(&out.stderr));
}

#[test]
fn inspect_with_a_shape_optimises_and_shows_the_declared_shape_too() {
    let m = crate::model("digits_cnn_dynamic.onnx");
    let out = edgeinfer(&["inspect", path(&m), "--input-shape", "image=1,3,40,48"]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let stdout = text(&out.stdout);
    for line in [
        "kernels      float",
        "  image            f32 [1, 3, 40, 48]  declared [batch, 3, height, width]",
        "  logits           f32 [1, 10]  declared [batch, 10]",
    ] {
        assert!(stdout.lines().any(|l| l == line), "`{line}` missing from:\n{stdout}");
    }
    for present in ["optimized    ", "load         "] {
        assert!(stdout.lines().any(|l| l.starts_with(present)), "`{present}` missing from:\n{stdout}");
    }
    assert!(!stdout.contains("to pin"), "{stdout}");

    let out = edgeinfer(&["inspect", path(&m), "--input-shape", "image=2,3,40,48", "--batch", "2", "--json"]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["pinned"], true);
    assert_eq!(v["inputs"][0]["shape"], serde_json::json!([2, 3, 40, 48]));
    assert_eq!(v["inputs"][0]["declared_shape"], serde_json::json!(["batch", 3, "height", "width"]));
    assert_eq!(v["outputs"][0]["shape"], serde_json::json!([2, 10]));
    assert_eq!(v["outputs"][0]["declared_shape"], serde_json::json!(["batch", 10]));
    let sizes: Vec<_> = v["symbolic_dims"].as_array().unwrap().iter().map(|d| d["size"].clone()).collect();
    assert_eq!(sizes, vec![serde_json::json!(2), serde_json::json!(40), serde_json::json!(48)]);
    assert_eq!(v["pin_example"], serde_json::Value::Null);
    assert!(v["optimized_nodes"].as_u64().unwrap() > 0, "{v}");
    assert!(v["timings_ms"]["optimize_ms"].as_f64().unwrap() > 0.0, "{v}");

    // A model without symbolic dimensions: no declared shape next to the pinned one, none to pin.
    let out = edgeinfer(&["inspect", path(&crate::model("digits_cnn_f32.onnx")), "--json"]);
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert!(v["inputs"][0].get("declared_shape").is_none(), "{v}");
    assert_eq!(v["symbolic_dims"], serde_json::json!([]));
    let out = edgeinfer(&["inspect", path(&crate::model("digits_cnn_f32.onnx"))]);
    assert!(!text(&out.stdout).contains("declared"), "{}", text(&out.stdout));
}

#[test]
#[cfg(feature = "onnx")]
fn inspect_shows_unnamed_dimensions_and_pins_them_by_position() {
    use prost::Message;
    use tract_onnx::pb::tensor_shape_proto::dimension::Value as Dim;
    use tract_onnx::prelude::Framework;
    // As some exporters write (x: [?, 3, ?, ?]): the symbolic dims of the digits CNN lose their names.
    let mut proto = tract_onnx::onnx().proto_model_for_path(crate::model("digits_cnn_dynamic.onnx")).unwrap();
    let graph = proto.graph.as_mut().unwrap();
    for value in graph.input.iter_mut().chain(graph.output.iter_mut()) {
        let Some(tract_onnx::pb::type_proto::Value::TensorType(t)) =
            value.r#type.as_mut().and_then(|t| t.value.as_mut())
        else {
            continue;
        };
        for dim in &mut t.shape.as_mut().unwrap().dim {
            if matches!(dim.value, Some(Dim::DimParam(_))) {
                dim.value = None;
            }
        }
    }
    let dir = tempfile::tempdir().unwrap();
    let m = dir.path().join("unnamed.onnx");
    std::fs::write(&m, proto.encode_to_vec()).unwrap();

    let out = edgeinfer(&["inspect", path(&m)]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let stdout = text(&out.stdout);
    for line in [
        "  image            f32 [?, 3, ?, ?]",
        "  logits           f32 [?, 10]",
        "to pin       image: dim 2, dim 3; dim 0 = 1 (--batch)",
        "example      --input-shape image=1,3,D2,D3",
    ] {
        assert!(stdout.lines().any(|l| l == line), "`{line}` missing from:\n{stdout}");
    }
    // The example works once its placeholders are sizes.
    let out = edgeinfer(&["inspect", path(&m), "--input-shape", "image=1,3,32,32"]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert!(text(&out.stdout).contains("f32 [1, 3, 32, 32]  declared [?, 3, ?, ?]"), "{}", text(&out.stdout));
    // Other commands, which must pin, say the same.
    let out = edgeinfer(&["bench", path(&m), "--runs", "1"]);
    assert_eq!(out.status.code(), Some(2));
    let err = text(&out.stderr);
    assert!(err.contains("dimensions 2 and 3 are symbolic") && err.contains("image=1,3,D2,D3"), "{err}");
}

#[test]
fn check_names_the_pipeline_input_and_dimensions_to_pin() {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("c.toml");
    let body = format!(
        "[[pipelines]]\nname = \"digits\"\nmodel = \"{}\"\nsource = {{ type = \"files\", path = \"{}\" }}\n",
        path(&crate::model("digits_cnn_dynamic.onnx")),
        path(&crate::model("samples/digits"))
    );
    std::fs::write(&config, &body).unwrap();
    let out = edgeinfer(&["check", path(&config)]);
    assert_eq!(out.status.code(), Some(2));
    let err = text(&out.stderr);
    assert_eq!(err.trim().lines().count(), 1, "{err}");
    for part in [
        "pipeline `digits`",
        "input `image`",
        "dimensions 2 (`height`) and 3 (`width`) are symbolic",
        "set input_shape = [1, 3, HEIGHT, WIDTH] in this pipeline",
    ] {
        assert!(err.contains(part), "`{part}` missing from: {err}");
    }
    // With the example's sizes filled in, the config checks.
    std::fs::write(&config, body.replace("source =", "input_shape = [1, 3, 32, 32]\nsource =")).unwrap();
    let out = edgeinfer(&["check", path(&config)]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert!(text(&out.stdout).contains("image [1, 3, 32, 32]"), "{}", text(&out.stdout));
}

#[test]
fn bench_json_has_the_documented_figures() {
    let out =
        edgeinfer(&["bench", path(&crate::model("vibration_int8.onnx")), "--runs", "20", "--warmup", "2", "--json"]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    for key in [
        "init_ms",
        "first_inference_ms",
        "warmup_mean_ms",
        "p50_ms",
        "p90_ms",
        "p99_ms",
        "mean_ms",
        "min_ms",
        "peak_rss_kb",
    ] {
        assert!(v[key].as_f64().is_some_and(|x| x > 0.0), "{key}: {v}");
    }
    assert!(v["p50_ms"].as_f64() <= v["p99_ms"].as_f64());
    assert_eq!(v["runs"], 20);
}

/// Writes a model `y = x * gain` (or, without `x`, `y = gain + gain`), `x`
/// f32 [1, 4] and `gain` an f32 scalar: declared as rank 0 when
/// `gain_rank0`, else with no shape at all (as some exporters write a
/// scalar input such as a sample rate).
#[cfg(feature = "onnx")]
fn scalar_input_model(dir: &std::path::Path, with_x: bool, gain_rank0: bool) -> std::path::PathBuf {
    use prost::Message;
    use tract_onnx::pb;
    use tract_onnx::pb::tensor_shape_proto::{dimension::Value as Dim, Dimension};
    let value = |name: &str, shape: Option<&[i64]>| pb::ValueInfoProto {
        name: name.into(),
        r#type: Some(pb::TypeProto {
            value: Some(pb::type_proto::Value::TensorType(pb::type_proto::Tensor {
                elem_type: pb::tensor_proto::DataType::Float as i32,
                shape: shape.map(|dims| pb::TensorShapeProto {
                    dim: dims
                        .iter()
                        .map(|&d| Dimension { value: Some(Dim::DimValue(d)), ..Default::default() })
                        .collect(),
                }),
            })),
            ..Default::default()
        }),
        ..Default::default()
    };
    let gain = value("gain", gain_rank0.then_some(&[][..]));
    let (inputs, node_inputs, out_shape) = if with_x {
        (vec![value("x", Some(&[1, 4])), gain], vec!["x".to_string(), "gain".to_string()], &[1i64, 4][..])
    } else {
        (vec![gain], vec!["gain".to_string(), "gain".to_string()], &[][..])
    };
    let op = if with_x { "Mul" } else { "Add" };
    let node = pb::NodeProto { input: node_inputs, output: vec!["y".into()], op_type: op.into(), ..Default::default() };
    let graph = pb::GraphProto {
        name: "scalar".into(),
        node: vec![node],
        input: inputs,
        output: vec![value("y", Some(out_shape))],
        ..Default::default()
    };
    let model = pb::ModelProto {
        ir_version: 8,
        opset_import: vec![pb::OperatorSetIdProto { domain: String::new(), version: 13 }],
        graph: Some(graph),
        ..Default::default()
    };
    let file = dir.join(format!(
        "scalar_{}{}.onnx",
        if with_x { "x_" } else { "" },
        if gain_rank0 { "rank0" } else { "shapeless" }
    ));
    std::fs::write(&file, model.encode_to_vec()).unwrap();
    file
}

#[test]
#[cfg(feature = "onnx")]
fn scalar_inputs_take_an_empty_shape_in_every_command() {
    let dir = tempfile::tempdir().unwrap();
    let shapeless = scalar_input_model(dir.path(), true, false);
    let x = dir.path().join("x.npy");
    Tensor { shape: vec![1, 4], data: Data::F32(vec![1.0, 2.0, 3.0, 4.0]) }.write_npy(&x).unwrap();
    let gain = dir.path().join("gain.npy");
    Tensor { shape: vec![], data: Data::F32(vec![0.5]) }.write_npy(&gain).unwrap();

    // A scalar input declared with no shape must be given one, and `NAME=` or `NAME=scalar` is it.
    let out = edgeinfer(&["inspect", path(&shapeless)]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert!(text(&out.stdout).contains("gain"), "{}", text(&out.stdout));
    let out = edgeinfer(&["bench", path(&shapeless), "--runs", "1"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(text(&out.stderr).contains("input `gain`: the model declares no shape"), "{}", text(&out.stderr));
    for flag in ["gain=", "gain=scalar"] {
        let out = edgeinfer(&["inspect", path(&shapeless), "--input-shape", flag, "--json"]);
        assert!(out.status.success(), "{flag}: {}", text(&out.stderr));
        let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        assert_eq!(v["inputs"][1]["name"], "gain");
        assert_eq!(v["inputs"][1]["shape"], serde_json::json!([]), "{v}");
        let out =
            edgeinfer(&["bench", path(&shapeless), "--input-shape", flag, "--runs", "2", "--warmup", "0", "--json"]);
        assert!(out.status.success(), "{flag}: {}", text(&out.stderr));
        let out =
            edgeinfer(&["infer", path(&shapeless), "--input-shape", flag, "--npy", path(&x), "--npy", path(&gain)]);
        assert!(out.status.success(), "{flag}: {}", text(&out.stderr));
        let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        assert_eq!(v["outputs"][0]["value"], serde_json::json!([[0.5, 1.0, 1.5, 2.0]]), "{v}");
    }
    // The 0-d array pins the scalar by itself.
    let out = edgeinfer(&["infer", path(&shapeless), "--npy", path(&x), "--npy", path(&gain)]);
    assert!(out.status.success(), "{}", text(&out.stderr));

    // A shape whose rank the model contradicts is one line naming the input.
    let rank0 = scalar_input_model(dir.path(), true, true);
    for (flag, input) in [("gain=1", "gain"), ("x=scalar", "x")] {
        for cmd in ["inspect", "bench", "infer"] {
            let mut args = vec![cmd, path(&rank0), "--input-shape", flag];
            if cmd == "infer" {
                args.extend(["--npy", path(&x), "--npy", path(&gain)]);
            }
            let out = edgeinfer(&args);
            let err = text(&out.stderr);
            assert_eq!(out.status.code(), Some(2), "{cmd} {flag}: {err}");
            assert_eq!(err.trim().lines().count(), 1, "{cmd} {flag}: {err}");
            assert!(err.contains(&format!("`{input}`")) && err.contains("dimensions"), "{cmd} {flag}: {err}");
        }
    }
    // A rank-0 declaration needs no flag; a single scalar input takes `scalar` without a name.
    let out = edgeinfer(&["bench", path(&rank0), "--runs", "1", "--warmup", "0"]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let only = scalar_input_model(dir.path(), false, false);
    let out = edgeinfer(&["infer", path(&only), "--input-shape", "scalar", "--npy", path(&gain)]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["outputs"][0]["shape"], serde_json::json!([]), "{v}");
    assert_eq!(v["outputs"][0]["value"], serde_json::json!(1.0), "{v}");
    // A malformed size says how to write a scalar.
    let out = edgeinfer(&["bench", path(&only), "--input-shape", "gain=one"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(text(&out.stderr).contains("`NAME=scalar` for a scalar"), "{}", text(&out.stderr));
}

#[test]
fn bench_takes_input_shape_like_infer() {
    let m = crate::model("digits_cnn_dynamic.onnx");
    let out = edgeinfer(&["bench", path(&m), "--runs", "1", "--warmup", "0"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(text(&out.stderr).contains("--input-shape image=1,3,HEIGHT,WIDTH"), "{}", text(&out.stderr));
    let out =
        edgeinfer(&["bench", path(&m), "--input-shape", "image=2,3,40,48", "--runs", "2", "--warmup", "0", "--json"]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["runs"], 2);
    // The same syntax without a name (the first input), and the same errors as infer.
    let out = edgeinfer(&["bench", path(&m), "--input-shape", "1x3x32x32", "--runs", "1", "--warmup", "0"]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let out = edgeinfer(&["bench", path(&m), "--input-shape", "image=1,1,32,32", "--runs", "1"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(text(&out.stderr).contains("dimension 1 is fixed at 3"), "{}", text(&out.stderr));
    let out = edgeinfer(&["bench", path(&m), "--input-shape", "pixels=1,3,32,32", "--runs", "1"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(text(&out.stderr).contains("no such input"), "{}", text(&out.stderr));
}
