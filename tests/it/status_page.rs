//! The status page and `/metrics` (`[http]`) against a running daemon: the
//! page in a real browser (Debian's headless Chromium) showing a live camera
//! pipeline (ffmpeg as the camera, the fetched detector on a real photo) with
//! its boxes and latency plot; `/metrics` through a strict text-format parser,
//! its counters checked against the health message a real subscriber gets;
//! basic auth; a taken port, which must not stop inference.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::io::{Read, Write};
use std::path::PathBuf;
use std::process::Command;
use std::time::{Duration, Instant};

use serde_json::Value;

use crate::support::{free_port, Daemon, Mosquitto, Subscriber};

/// A plain HTTP/1.0 GET (so the body ends with the connection): status, headers, body.
fn get(port: u16, path: &str, authorization: Option<&str>) -> (u16, String, Vec<u8>) {
    let mut s = std::net::TcpStream::connect(("127.0.0.1", port)).expect("connect to the status page");
    s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    let auth = authorization.map(|a| format!("Authorization: {a}\r\n")).unwrap_or_default();
    write!(s, "GET {path} HTTP/1.0\r\nHost: 127.0.0.1\r\n{auth}\r\n").unwrap();
    let mut raw = Vec::new();
    s.read_to_end(&mut raw).unwrap();
    let split = raw.windows(4).position(|w| w == b"\r\n\r\n").expect("a header block");
    let head = String::from_utf8_lossy(&raw[..split]).to_string();
    let status = head.split(' ').nth(1).and_then(|c| c.parse().ok()).expect("a status code");
    (status, head, raw[split + 4..].to_vec())
}

fn get_json(port: u16, path: &str, authorization: Option<&str>) -> Value {
    let (status, head, body) = get(port, path, authorization);
    assert_eq!(status, 200, "{path}: {head}");
    serde_json::from_slice(&body).unwrap()
}

/// Polls `/api/status` until `pred` holds.
fn wait_status(port: u16, timeout: Duration, pred: impl Fn(&Value) -> bool, daemon: &Daemon) -> Value {
    let start = Instant::now();
    loop {
        if crate::support::wait_port(port, Duration::from_millis(100)) {
            let s = get_json(port, "/api/status", None);
            if pred(&s) {
                return s;
            }
            if start.elapsed() > timeout {
                panic!("status never got there: {s}\nstderr: {}", daemon.stderr());
            }
        } else if start.elapsed() > timeout {
            panic!("the status page never listened on {port}\nstderr: {}", daemon.stderr());
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// Debian's Chromium, or None (then the test says it skipped, and fails under CI,
/// where `.ci/test` installs it).
fn chromium() -> Option<PathBuf> {
    let found = ["chromium", "chromium-browser", "google-chrome"].iter().find_map(|name| {
        let ok = Command::new(name).arg("--version").output().is_ok_and(|o| o.status.success());
        ok.then(|| PathBuf::from(name))
    });
    if found.is_none() {
        assert!(
            std::env::var_os("CI").is_none(),
            "CI has no chromium: .ci/test installs it (apt-get install chromium)"
        );
        eprintln!("SKIPPED: no chromium on this machine (apt-get install chromium); the page was not rendered");
    }
    found
}

/// Runs headless Chromium on `url` with `extra` arguments (`--dump-dom`, `--screenshot=...`).
/// Flags: no sandbox (tests may run as root), and nothing that reaches for the internet.
fn run_chromium(browser: &PathBuf, url: &str, profile: &std::path::Path, extra: &[&str]) -> String {
    let out = Command::new(browser)
        .args([
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-quic",
            "--no-first-run",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            "--window-size=1400,1000",
            // Time for the script's first round of fetches, which the page answers at once.
            "--virtual-time-budget=4000",
        ])
        .arg(format!("--user-data-dir={}", profile.display()))
        .args(extra)
        .arg(url)
        .output()
        .expect("chromium runs");
    assert!(out.status.success(), "chromium failed: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8(out.stdout).unwrap()
}

#[test]
fn status_page_shows_a_live_camera_pipeline_with_boxes_and_a_latency_plot_in_a_browser() {
    let detector = crate::model("detector_yolov8n.onnx");
    assert!(detector.is_file(), "run `python3 models/fetch_detector.py` first (.ci/test does)");
    let broker = Mosquitto::start();
    let port = free_port();
    let photo = crate::model("samples/detect/faces.jpg");
    // ffmpeg plays the camera: the photo as an endless 4 fps MJPEG stream.
    let mut daemon = Daemon::start(&format!(
        r#"
device = "shed-cam"
[mqtt]
url = "mqtt://127.0.0.1:{broker}"
[http]
listen = "127.0.0.1:{port}"
refresh_ms = 500
[[pipelines]]
name = "door"
model = "{model}"
input_shape = [1, 3, 320, 320]
source = {{ type = "pipe", format = "mjpeg", command = ["ffmpeg", "-loglevel", "error", "-re", "-loop", "1", "-framerate", "4", "-i", "{photo}", "-f", "mjpeg", "-q:v", "4", "-"] }}
preprocess = {{ type = "image", resize = "letterbox" }}
postprocess = {{ type = "detect", min_score = 0.25 }}
[[pipelines]]
name = "vibration"
model = "{{models}}/vibration_int8.onnx"
source = {{ type = "synthetic", signal = "vibration", rate_hz = 1000 }}
"#,
        broker = broker.port,
        model = detector.display(),
        photo = photo.display(),
    ));
    // Inferences, a frame, and two history points (one plot line needs two).
    let status = wait_status(
        port,
        Duration::from_secs(90),
        |s| {
            let door = &s["pipelines"]["door"];
            s["health"]["mqtt"]["connected"] == true
                && door["frame"]["seq"].as_u64().is_some()
                && door["recent"]["points"].as_u64() >= Some(2)
                && s["health"]["pipelines"]["door"]["inferences"].as_u64() >= Some(3)
        },
        &daemon,
    );
    let door = &status["pipelines"]["door"];
    assert_eq!(door["source"], "pipe");
    assert_eq!(door["model"]["name"], "detector_yolov8n");
    assert_eq!(door["model"]["sha256"].as_str().map(str::len), Some(64));
    assert_eq!(
        (door["frame"]["width"].as_u64(), door["frame"]["height"].as_u64()),
        (Some(768), Some(384)),
        "the photo's size"
    );
    assert!(door["latest"]["result"]["detections"].as_array().is_some_and(|d| !d.is_empty()), "{door}");
    assert!(status["pipelines"]["vibration"]["frame"].is_null(), "a sensor pipeline has no frame");

    let Some(browser) = chromium() else {
        daemon.signal("TERM");
        return;
    };
    let profile = tempfile::tempdir().unwrap();
    let url = format!("http://127.0.0.1:{port}/");
    let dom = run_chromium(&browser, &url, profile.path(), &["--dump-dom"]);
    let has = |what: &str| assert!(dom.contains(what), "the page's DOM has no {what}:\n{dom}");
    // The header, filled in by the script from the health message.
    has(r#"<span id="device">shed-cam</span>"#);
    has(r#"class="up">connected, queue"#);
    // Both pipelines, the camera with its frame and labelled boxes, each with its plot.
    has(r#"data-pipeline="door""#);
    has(r#"data-pipeline="vibration""#);
    has(r#"<svg xmlns="http://www.w3.org/2000/svg" class="camera""#);
    has(r#"href="data:image/jpeg;base64,"#);
    has(r#"<g class="det" data-label="FACE_FEMALE">"#);
    assert!(dom.matches(r#"class="latency""#).count() >= 2, "a plot per pipeline:\n{dom}");
    has(r#"<polyline class="p50" data-stage="inference""#);
    has("detector_yolov8n");
    // The script did not fail: it stamped the time of its last update, and it updated the
    // page in place more than once (every refresh_ms) without a reload.
    has(r#"<span class="fact" id="conn">updated "#);
    let updates = dom
        .split(r#"data-updates=""#)
        .nth(1)
        .and_then(|rest| rest.split('"').next())
        .and_then(|n| n.parse::<u32>().ok());
    assert!(updates.is_some_and(|n| n >= 2), "updates: {updates:?}\n{dom}");

    // The screenshot, kept as a test artefact (target/tmp/artefacts/status-page.png).
    let dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("artefacts");
    std::fs::create_dir_all(&dir).unwrap();
    let shot = dir.join("status-page.png");
    let _ = std::fs::remove_file(&shot);
    run_chromium(&browser, &url, profile.path(), &[&format!("--screenshot={}", shot.display())]);
    let img = image::open(&shot).expect("a PNG screenshot").to_rgb8();
    assert_eq!(img.dimensions(), (1400, 1000));
    // A rendered page, not a blank one: the photo alone brings thousands of colours.
    let colours: HashSet<[u8; 3]> = img.pixels().map(|p| p.0).collect();
    assert!(colours.len() > 2000, "{} colours only in {}", colours.len(), shot.display());
    eprintln!("status page screenshot: {}", shot.display());
    daemon.signal("TERM");
    assert_eq!(daemon.wait(Duration::from_secs(20)), Some(0), "stderr: {}", daemon.stderr());
}

/// One metric family as the strict parser read it.
#[derive(Debug, Default)]
struct Family {
    kind: String,
    help: bool,
    /// (sample name, labels) -> value, in file order.
    samples: Vec<(String, BTreeMap<String, String>, f64)>,
}

/// Parses Prometheus' text format (0.0.4) strictly: every line is a HELP,
/// a TYPE or a sample; a family's TYPE comes before its samples, which are
/// contiguous; names, label syntax and escapes, and values are checked; no
/// sample repeats; counters end in `_total`; histogram buckets rise to
/// `+Inf`, which equals `_count`. Panics naming the line at fault.
fn parse_exposition(text: &str) -> BTreeMap<String, Family> {
    assert!(text.ends_with('\n'), "the exposition ends with a newline");
    let name_ok = |n: &str| {
        let mut c = n.chars();
        c.next().is_some_and(|f| f.is_ascii_alphabetic() || f == '_' || f == ':')
            && c.all(|ch| ch.is_ascii_alphanumeric() || ch == '_' || ch == ':')
    };
    let label_ok = |n: &str| {
        let mut c = n.chars();
        c.next().is_some_and(|f| f.is_ascii_alphabetic() || f == '_')
            && c.all(|ch| ch.is_ascii_alphanumeric() || ch == '_')
    };
    let mut families: BTreeMap<String, Family> = BTreeMap::new();
    let mut order: Vec<String> = Vec::new();
    let mut seen = HashSet::new();
    for (no, line) in text.lines().enumerate() {
        let at = |why: &str| format!("line {}: {why}: {line:?}", no + 1);
        if let Some(rest) = line.strip_prefix("# ") {
            let mut parts = rest.splitn(3, ' ');
            let (kw, name, arg) = (parts.next().unwrap(), parts.next().unwrap_or(""), parts.next().unwrap_or(""));
            assert!(name_ok(name), "{}", at("bad metric name"));
            let f = families.entry(name.to_string()).or_default();
            match kw {
                "HELP" => {
                    assert!(!f.help && f.samples.is_empty(), "{}", at("HELP twice or after samples"));
                    assert!(!arg.is_empty(), "{}", at("empty HELP"));
                    f.help = true;
                }
                "TYPE" => {
                    assert!(f.kind.is_empty() && f.samples.is_empty(), "{}", at("TYPE twice or after samples"));
                    assert!(
                        ["counter", "gauge", "histogram", "summary", "untyped"].contains(&arg),
                        "{}",
                        at("bad type")
                    );
                    f.kind = arg.to_string();
                    order.push(name.to_string());
                }
                _ => panic!("{}", at("a comment that is neither HELP nor TYPE")),
            }
            continue;
        }
        assert!(!line.is_empty() && !line.starts_with('#'), "{}", at("blank line or bare comment"));
        // name{labels} value
        let name_end = line.find(['{', ' ']).unwrap_or_else(|| panic!("{}", at("no value")));
        let name = &line[..name_end];
        assert!(name_ok(name), "{}", at("bad sample name"));
        let mut rest = &line[name_end..];
        let mut labels = BTreeMap::new();
        if let Some(inner) = rest.strip_prefix('{') {
            let mut chars = inner.char_indices().peekable();
            loop {
                let start = chars.peek().map(|(i, _)| *i).unwrap_or_else(|| panic!("{}", at("unclosed {")));
                if inner[start..].starts_with('}') {
                    rest = &inner[start + 1..];
                    break;
                }
                let eq = inner[start..].find('=').unwrap_or_else(|| panic!("{}", at("label without =")));
                let key = &inner[start..start + eq];
                assert!(label_ok(key), "{}", at("bad label name"));
                assert!(inner[start + eq + 1..].starts_with('"'), "{}", at("label value not quoted"));
                let mut value = String::new();
                let mut i = start + eq + 2;
                let bytes = inner.as_bytes();
                loop {
                    let c = *bytes.get(i).unwrap_or_else(|| panic!("{}", at("unterminated label value")));
                    match c {
                        b'"' => break,
                        b'\\' => {
                            match bytes.get(i + 1) {
                                Some(b'\\') => value.push('\\'),
                                Some(b'"') => value.push('"'),
                                Some(b'n') => value.push('\n'),
                                _ => panic!("{}", at("bad escape")),
                            }
                            i += 2;
                        }
                        b'\n' => panic!("{}", at("raw newline in a label value")),
                        _ => {
                            let ch = inner[i..].chars().next().unwrap();
                            value.push(ch);
                            i += ch.len_utf8();
                        }
                    }
                }
                assert!(labels.insert(key.to_string(), value).is_none(), "{}", at("label repeated"));
                i += 1;
                match bytes.get(i) {
                    Some(b',') => i += 1,
                    Some(b'}') => {}
                    _ => panic!("{}", at("expected , or } after a label")),
                }
                while chars.peek().is_some_and(|(j, _)| *j < i) {
                    chars.next();
                }
            }
        }
        let mut fields =
            rest.strip_prefix(' ').unwrap_or_else(|| panic!("{}", at("no space before the value"))).split(' ');
        let value = match fields.next().unwrap() {
            "+Inf" => f64::INFINITY,
            "-Inf" => f64::NEG_INFINITY,
            "NaN" => f64::NAN,
            v => v.parse::<f64>().unwrap_or_else(|_| panic!("{}", at("value is not a number"))),
        };
        if let Some(ts) = fields.next() {
            ts.parse::<i64>().unwrap_or_else(|_| panic!("{}", at("bad timestamp")));
        }
        assert!(fields.next().is_none(), "{}", at("trailing fields"));
        // The family: the name itself, or a histogram's _bucket/_sum/_count.
        let family = ["_bucket", "_sum", "_count"]
            .iter()
            .filter_map(|s| name.strip_suffix(s))
            .find(|base| families.get(*base).is_some_and(|f| f.kind == "histogram"))
            .unwrap_or(name)
            .to_string();
        let f = families.get_mut(&family).unwrap_or_else(|| panic!("{}", at("sample before its TYPE")));
        assert!(order.last() == Some(&family), "{}", at("samples of a family are not contiguous"));
        assert!(seen.insert((name.to_string(), labels.clone())), "{}", at("sample repeated"));
        f.samples.push((name.to_string(), labels, value));
    }
    for (name, f) in &families {
        assert!(!f.kind.is_empty(), "{name}: HELP without TYPE");
        assert!(f.help, "{name}: no HELP");
        if f.kind == "counter" {
            assert!(name.ends_with("_total"), "{name}: a counter's name ends in _total");
            assert!(f.samples.iter().all(|s| s.2 >= 0.0), "{name}: negative counter");
        }
        if f.kind == "histogram" {
            // Per label set (without le): buckets ascending in le and count, +Inf = _count.
            let mut series: HashMap<BTreeMap<String, String>, Vec<(f64, f64)>> = HashMap::new();
            let mut counts = HashMap::new();
            for (sample, labels, v) in &f.samples {
                let mut key = labels.clone();
                if sample.ends_with("_bucket") {
                    let le = key.remove("le").unwrap_or_else(|| panic!("{name}: bucket without le"));
                    let le = if le == "+Inf" { f64::INFINITY } else { le.parse().unwrap() };
                    series.entry(key).or_default().push((le, *v));
                } else if sample.ends_with("_count") {
                    counts.insert(key, *v);
                }
            }
            assert!(!series.is_empty(), "{name}: no buckets");
            for (key, buckets) in &series {
                assert!(buckets.windows(2).all(|w| w[0].0 < w[1].0 && w[0].1 <= w[1].1), "{name}{key:?}: {buckets:?}");
                let last = buckets.last().unwrap();
                assert!(last.0.is_infinite(), "{name}{key:?}: no +Inf bucket");
                assert_eq!(Some(&last.1), counts.get(key), "{name}{key:?}: +Inf bucket != _count");
            }
        }
    }
    families
}

/// The value of the sample `name` with exactly these labels.
fn value(families: &BTreeMap<String, Family>, family: &str, name: &str, labels: &[(&str, &str)]) -> f64 {
    let want: BTreeMap<String, String> = labels.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
    families[family]
        .samples
        .iter()
        .find(|(n, l, _)| n == name && *l == want)
        .unwrap_or_else(|| panic!("no {name}{labels:?}"))
        .2
}

#[test]
fn metrics_pass_a_strict_parser_and_match_the_health_message_behind_basic_auth() {
    let broker = Mosquitto::start();
    let port = free_port();
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("password"), "s3cret pass\n").unwrap();
    let rows = dir.path().join("rows.csv");
    // Five good rows of the 30 features the model wants, one row of the wrong width.
    let row = vec!["0.5"; 30].join(",");
    let text = format!("{row}\n{row}\n1,2,3\n{row}\n{row}\n{row}\n");
    std::fs::write(&rows, text).unwrap();
    let mut sub = Subscriber::connect(broker.port, "edgeinfer/metrics-t/health");
    let mut daemon = Daemon::start(&format!(
        r#"
device = "metrics-t"
[mqtt]
url = "mqtt://127.0.0.1:{broker}"
queue_dir = "{queue}"
[health]
interval_s = 1
[http]
listen = "127.0.0.1:{port}"
username = "grafana"
password_file = "{pw}"
[[pipelines]]
name = "tumour"
model = "{{models}}/breast_cancer_mlp_f32.onnx"
source = {{ type = "lines", from = "{rows}", format = "csv" }}
"#,
        broker = broker.port,
        pw = dir.path().join("password").display(),
        rows = rows.display(),
        queue = dir.path().join("queue").display(),
    ));
    assert!(crate::support::wait_port(port, Duration::from_secs(60)), "stderr: {}", daemon.stderr());
    // Basic auth on every route: nothing without the password, nothing with a wrong one.
    for path in ["/", "/metrics", "/api/status", "/pipelines/tumour/latency.svg"] {
        let (status, head, _) = get(port, path, None);
        assert_eq!(status, 401, "{path}: {head}");
        assert!(head.contains("www-authenticate: Basic realm=\"edgeinfer\""), "{head}");
    }
    let wrong = format!("Basic {}", b64("grafana:wrong"));
    assert_eq!(get(port, "/metrics", Some(&wrong)).0, 401);
    let auth = format!("Basic {}", b64("grafana:s3cret pass"));
    let (status, _, page) = get(port, "/", Some(&auth));
    assert_eq!(status, 200);
    assert!(String::from_utf8_lossy(&page).contains("<main id=\"pipelines\">"));
    assert_eq!(get(port, "/pipelines/nope/latency.svg", Some(&auth)).0, 404);
    assert_eq!(get(port, "/pipelines/tumour/view.svg", Some(&auth)).0, 404, "no frames in a sensor pipeline");

    // The health message a subscriber gets once every row is through...
    let health = sub
        .wait_for(Duration::from_secs(60), |m| m.json()["pipelines"]["tumour"]["inputs"] == 6)
        .unwrap_or_else(|| panic!("no health with 6 inputs; stderr: {}", daemon.stderr()))
        .json();
    let h = &health["pipelines"]["tumour"];
    assert_eq!((h["inferences"].as_u64(), h["errors"].as_u64()), (Some(5), Some(1)), "{h}");
    // ...and /metrics, scraped after it: every pipeline counter is the same.
    let (status, head, body) = get(port, "/metrics", Some(&auth));
    assert_eq!(status, 200);
    assert!(head.contains("content-type: text/plain; version=0.0.4"), "{head}");
    let text = String::from_utf8(body).unwrap();
    let m = parse_exposition(&text);
    let p = [("pipeline", "tumour")];
    let counter = |name: &str| value(&m, name, name, &p);
    assert_eq!(counter("edgeinfer_inputs_total"), h["inputs"].as_f64().unwrap());
    assert_eq!(counter("edgeinfer_inferences_total"), h["inferences"].as_f64().unwrap());
    assert_eq!(counter("edgeinfer_errors_total"), h["errors"].as_f64().unwrap());
    assert_eq!(counter("edgeinfer_snapshots_total"), h["snapshots"]["taken"].as_f64().unwrap());
    assert_eq!(counter("edgeinfer_source_restarts_total"), h["source"]["restarts"].as_f64().unwrap());
    assert_eq!(counter("edgeinfer_source_up"), h["source"]["running"].as_bool().unwrap() as u8 as f64);
    for (reason, v) in h["dropped"].as_object().unwrap() {
        let got = value(&m, "edgeinfer_dropped_total", "edgeinfer_dropped_total", &[p[0], ("reason", reason)]);
        assert_eq!(got, v.as_f64().unwrap(), "dropped {reason}");
    }
    for stage in ["preprocess", "inference", "postprocess", "total"] {
        let l = [p[0], ("stage", stage)];
        let count = value(&m, "edgeinfer_inference_seconds", "edgeinfer_inference_seconds_count", &l);
        assert_eq!(count, 5.0, "{stage}: one latency per inference");
        let sum = value(&m, "edgeinfer_inference_seconds", "edgeinfer_inference_seconds_sum", &l);
        assert!(sum > 0.0 && sum < 60.0, "{stage}: {sum} s");
    }
    let info = &m["edgeinfer_model_info"].samples[0].1;
    assert_eq!(info["model"], "breast_cancer_mlp_f32");
    assert_eq!(info["quantization"], "float (not quantized)");
    assert_eq!(
        value(
            &m,
            "edgeinfer_build_info",
            "edgeinfer_build_info",
            &[("version", env!("CARGO_PKG_VERSION")), ("device", "metrics-t")]
        ),
        1.0
    );
    assert_eq!(m["edgeinfer_mqtt_connected"].samples[0].2, 1.0);
    assert_eq!(m["edgeinfer_mqtt_reconnects_total"].samples[0].2, health["mqtt"]["reconnects"].as_f64().unwrap());
    let published = m["edgeinfer_mqtt_published_total"].samples[0].2;
    assert!(published >= health["mqtt"]["published"].as_f64().unwrap(), "published only grows");
    assert!(m["process_resident_memory_bytes"].samples[0].2 > 1e6);
    assert_eq!(m["edgeinfer_inference_seconds"].kind, "histogram");
    let disk = &health["mqtt"]["disk_queue"];
    assert!(disk.is_object(), "{health}");
    assert_eq!(m["edgeinfer_disk_queue_dropped_total"].samples.len(), 2, "full and age");
    assert!(m["edgeinfer_disk_queue_bytes"].samples[0].2 >= 0.0);
    // The sample Grafana dashboard asks only for metrics that exist.
    let dashboard = std::fs::read_to_string(crate::root().join("deploy/grafana-dashboard.json")).unwrap();
    let dashboard: Value = serde_json::from_str(&dashboard).expect("the dashboard is JSON");
    let mut asked = 0;
    for panel in dashboard["panels"].as_array().unwrap() {
        for t in panel["targets"].as_array().unwrap() {
            let expr = t["expr"].as_str().unwrap();
            for word in expr.split(|c: char| !(c.is_ascii_alphanumeric() || c == '_')) {
                if word.starts_with("edgeinfer_") || word.starts_with("process_") {
                    let family = word.trim_end_matches("_bucket");
                    assert!(m.contains_key(family), "the dashboard asks for {word}, which /metrics lacks: {expr}");
                    asked += 1;
                }
            }
        }
    }
    assert!(asked > 10, "{asked}");

    // /api/status carries the same health message the subscriber got.
    let status = get_json(port, "/api/status", Some(&auth));
    assert_eq!(status["health"]["pipelines"]["tumour"]["inferences"], h["inferences"]);
    assert_eq!(status["pipelines"]["tumour"]["source"], "lines");
    assert!(status["pipelines"]["tumour"]["latest"]["result"].is_object(), "{status}");
    daemon.signal("TERM");
    assert_eq!(daemon.wait(Duration::from_secs(20)), Some(0), "stderr: {}", daemon.stderr());
}

fn b64(s: &str) -> String {
    use base64::Engine as _;
    base64::engine::general_purpose::STANDARD.encode(s)
}

#[test]
fn the_parser_refuses_what_prometheus_would() {
    let ok = "# HELP a_total A.\n# TYPE a_total counter\na_total{x=\"q\\\"\"} 3\n";
    assert_eq!(parse_exposition(ok)["a_total"].samples[0].1["x"], "q\"");
    for bad in [
        "a_total 3\n",                                                       // no TYPE
        "# HELP a_total A.\n# TYPE a_total counter\na_total{x=\"q} 3\n",     // unterminated
        "# HELP a_total A.\n# TYPE a_total counter\na_total{x=\"\\q\"} 3\n", // bad escape
        "# HELP a_total A.\n# TYPE a_total counter\na_total three\n",        // not a number
        "# HELP a A.\n# TYPE a counter\na 3\n",                              // counter without _total
        "# HELP a_total A.\n# TYPE a_total counter\na_total 3\na_total 4\n", // repeated
        "# HELP h H.\n# TYPE h histogram\nh_bucket{le=\"1\"} 2\nh_bucket{le=\"+Inf\"} 1\nh_count 1\nh_sum 1\n",
    ] {
        assert!(std::panic::catch_unwind(|| parse_exposition(bad)).is_err(), "accepted: {bad}");
    }
}

#[test]
fn a_taken_port_is_logged_and_inference_goes_on_without_the_page() {
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = taken.local_addr().unwrap().port();
    let dir = tempfile::tempdir().unwrap();
    let rows = dir.path().join("rows.csv");
    std::fs::write(&rows, format!("{}\n", vec!["0.5"; 30].join(","))).unwrap();
    let mut daemon = Daemon::start(&format!(
        "[http]\nlisten = \"127.0.0.1:{port}\"\n[[pipelines]]\nname = \"p\"\nmodel = \"{{models}}/breast_cancer_mlp_f32.onnx\"\n\
         source = {{ type = \"lines\", from = \"{}\", format = \"csv\" }}\n[[pipelines.outputs]]\ntype = \"stdout\"\n",
        rows.display()
    ));
    let deadline = Instant::now() + Duration::from_secs(60);
    while daemon.stdout().lines().count() < 1 {
        assert!(Instant::now() < deadline, "no result; stderr: {}", daemon.stderr());
        std::thread::sleep(Duration::from_millis(100));
    }
    let err = daemon.stderr();
    assert!(err.contains(&format!("http.listen: cannot listen on 127.0.0.1:{port}")), "{err}");
    assert!(err.contains("running without the status page and /metrics"), "{err}");
    daemon.signal("TERM");
    assert_eq!(daemon.wait(Duration::from_secs(20)), Some(0), "stderr: {}", daemon.stderr());
}
