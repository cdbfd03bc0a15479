//! Optional Cargo features through the real binary: `--version` lists them,
//! and a config that needs one this build lacks fails `check` and `run` with
//! the feature's name (exit 2), while with the feature the same config passes
//! `check`. Runs in every build: which branch each case takes depends on how
//! the test binary (and so the daemon) was built.

use crate::support::edgeinfer;

/// Writes `config` (with `{models}` and `{dir}` filled in) and runs `edgeinfer <cmd>` on it.
fn run(cmd: &str, config: &str, dir: &std::path::Path) -> (Option<i32>, String, String) {
    let path = dir.join("c.toml");
    let text = config
        .replace("{models}", crate::root().join("models").to_str().unwrap())
        .replace("{dir}", dir.to_str().unwrap());
    std::fs::write(&path, text).unwrap();
    let out = edgeinfer().arg(cmd).arg(&path).env("RUST_LOG", "warn").output().expect("binary runs");
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// A pipeline on the digits model (camera sources); `SENSOR` on the vibration model.
const PIPELINE: &str = "\n[[pipelines]]\nname = \"p\"\nmodel = \"{models}/digits_cnn_int8.onnx\"\n";
const SENSOR: &str = "\n[[pipelines]]\nname = \"p\"\nmodel = \"{models}/vibration_f32.onnx\"\n";

#[test]
fn version_lists_the_compiled_features() {
    let out = edgeinfer().arg("--version").output().unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(0), "{text}");
    let features = text.lines().find_map(|l| l.strip_prefix("features: ")).unwrap_or_else(|| panic!("{text}"));
    let left_out = text.lines().find_map(|l| l.strip_prefix("left out: ")).unwrap_or_else(|| panic!("{text}"));
    for (name, on) in [
        ("onnx", cfg!(feature = "onnx")),
        ("broker", cfg!(feature = "broker")),
        ("v4l2", cfg!(feature = "v4l2")),
        ("http-source", cfg!(feature = "http-source")),
        ("serial", cfg!(feature = "serial")),
        ("tls", cfg!(feature = "tls")),
        ("threads", cfg!(feature = "threads")),
    ] {
        let listed = |list: &str| list.split(", ").any(|f| f == name);
        assert_eq!(listed(features), on, "{name}: {text}");
        assert_eq!(listed(left_out), !on, "{name}: {text}");
    }
    // `-V` stays the one short line scripts expect.
    let out = edgeinfer().arg("-V").output().unwrap();
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), format!("edgeinfer {}", env!("CARGO_PKG_VERSION")));
}

#[test]
fn a_config_needing_a_missing_feature_fails_check_and_run_naming_it() {
    let dir = tempfile::tempdir().unwrap();
    // A CA certificate, so `check` can build the TLS configuration where TLS is in.
    let ca = rcgen::generate_simple_self_signed(vec!["broker.example".into()]).unwrap();
    std::fs::write(dir.path().join("ca.pem"), ca.cert.pem()).unwrap();
    let stdout_output = "  [[pipelines.outputs]]\n  type = \"stdout\"\n";
    let cases = [
        (
            "onnx",
            cfg!(feature = "onnx"),
            "an ONNX model",
            format!("{PIPELINE}source = {{ type = \"files\", path = \"{{models}}/samples/digits\" }}\n{stdout_output}"),
        ),
        (
            "http-source",
            cfg!(feature = "http-source"),
            "source type `http`",
            format!("{PIPELINE}source = {{ type = \"http\", url = \"http://127.0.0.1:9/cam\" }}\n{stdout_output}"),
        ),
        (
            "serial",
            cfg!(feature = "serial"),
            "source type `serial`",
            format!("{SENSOR}source = {{ type = \"serial\", port = \"/dev/ttyUSB9\" }}\n{stdout_output}"),
        ),
        (
            "v4l2",
            cfg!(feature = "v4l2"),
            "source type `v4l2`",
            format!("{PIPELINE}source = {{ type = \"v4l2\", device = \"/dev/video9\" }}\n{stdout_output}"),
        ),
        (
            "tls",
            cfg!(feature = "tls"),
            "an mqtts:// broker",
            format!(
                "[mqtt]\nurl = \"mqtts://127.0.0.1:8883\"\ntls = {{ ca_file = \"{{dir}}/ca.pem\" }}\n{PIPELINE}\
                 source = {{ type = \"files\", path = \"{{models}}/samples/digits\" }}\n"
            ),
        ),
        (
            "threads",
            cfg!(feature = "threads"),
            "more than one thread",
            format!(
                "[engine]\nthreads = 2\n{PIPELINE}source = {{ type = \"files\", path = \"{{models}}/samples/digits\" }}\n\
                 {stdout_output}"
            ),
        ),
        (
            "broker",
            cfg!(feature = "broker"),
            "a config without mqtt.url (it starts the embedded MQTT broker)",
            // No URL, and the default output is MQTT: the embedded broker.
            format!("{PIPELINE}source = {{ type = \"files\", path = \"{{models}}/samples/digits\" }}\n"),
        ),
    ];
    for (feature, on, what, config) in cases {
        let (code, stdout, stderr) = run("check", &config, dir.path());
        if on && !cfg!(feature = "onnx") && feature != "onnx" {
            // A runtime-only build loads no ONNX model: the config passed this feature's check
            // and stopped at its model.
            assert_eq!(code, Some(2), "{feature}: {stdout}{stderr}");
            assert!(stderr.contains("an ONNX model needs edgeinfer built with the `onnx` feature"), "{stderr}");
            continue;
        }
        if on {
            assert_eq!(code, Some(0), "{feature}: check should pass: {stdout}{stderr}");
            continue;
        }
        assert_eq!(code, Some(2), "{feature}: {stdout}{stderr}");
        let want = format!("{what} needs edgeinfer built with the `{feature}` feature");
        assert!(stderr.contains(&want), "{feature}: want `{want}` in: {stderr}");
        assert!(stderr.contains(&format!("--features {feature}")), "{stderr}");
        // `run` refuses it the same way, before starting anything.
        let (code, _, stderr) = run("run", &config, dir.path());
        assert_eq!(code, Some(2), "{feature}: {stderr}");
        assert!(stderr.contains(&want), "{feature}: run: {stderr}");
    }
}
