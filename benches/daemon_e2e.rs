//! End-to-end daemon benchmark: the release binary with its embedded broker
//! and a real subscriber on loopback, for the shipped sensor model and the
//! MobileNetV2-shaped model. Prints capture-to-subscriber latency
//! percentiles, bare inference (`edgeinfer bench`) in the same run, the
//! overhead of everything that is not the model, and the daemon's peak RSS.
//! A benchmark measures and reports; it asserts nothing about time.
//!
//! Run: `cargo build --release && cargo bench --bench daemon_e2e`
//! (`EDGEINFER=path` picks another binary; `E2E_RESULTS=n` results per scenario).

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::mpsc::channel;
use std::time::{Duration, Instant, SystemTime};

struct Scenario {
    name: &'static str,
    model: &'static str,
    source: &'static str,
    warmup: usize,
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    let rank = ((p / 100.0) * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").and_then(|l| l.local_addr()).map(|a| a.port()).expect("free port")
}

fn peak_rss_kb(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
}

fn bare_p50(bin: &Path, model: &Path) -> f64 {
    let out = Command::new(bin)
        .args(["bench", model.to_str().unwrap(), "--runs", "200", "--warmup", "20", "--json"])
        .output()
        .expect("edgeinfer bench runs");
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).expect("bench JSON");
    v["p50_ms"].as_f64().unwrap_or(f64::NAN)
}

fn run(bin: &Path, root: &Path, s: &Scenario, n: usize) {
    let port = free_port();
    let dir = std::env::temp_dir().join(format!("edgeinfer-e2e-{}-{port}", s.name));
    std::fs::create_dir_all(&dir).unwrap();
    let model = root.join("models").join(s.model);
    let config = format!(
        "device = \"bench\"\n[broker]\nlisten = \"127.0.0.1:{port}\"\n[health]\ninterval_s = 0\n\
         [[pipelines]]\nname = \"{}\"\nmodel = \"{}\"\nsource = {}\n[[pipelines.outputs]]\ntype = \"mqtt\"\n",
        s.name,
        model.display(),
        s.source
    );
    let cfg_path = dir.join("edgeinfer.toml");
    std::fs::write(&cfg_path, config).unwrap();
    let mut daemon = Command::new(bin)
        .args(["run", cfg_path.to_str().unwrap()])
        .env("RUST_LOG", "warn")
        .stdout(Stdio::null())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("daemon starts");
    let start = Instant::now();
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(start.elapsed() < Duration::from_secs(30), "embedded broker did not start");
        std::thread::sleep(Duration::from_millis(20));
    }
    let mut opts = rumqttc::MqttOptions::new(format!("e2e-{port}"), "127.0.0.1", port);
    opts.set_keep_alive(Duration::from_secs(10));
    opts.set_max_packet_size(1 << 20, 1 << 20);
    let (client, mut connection) = rumqttc::Client::new(opts, 1024);
    client.subscribe(format!("edgeinfer/bench/{}/result", s.name), rumqttc::QoS::AtMostOnce).unwrap();
    let (tx, rx) = channel();
    std::thread::spawn(move || {
        for event in connection.iter() {
            match event {
                Ok(rumqttc::Event::Incoming(rumqttc::Packet::Publish(p))) => {
                    // Timestamp on receipt, before parsing.
                    if tx.send((SystemTime::now(), p.payload.to_vec())).is_err() {
                        return;
                    }
                }
                Ok(_) => {}
                // The daemon (and its broker) stopped: do not spin on reconnects during the bare bench.
                Err(_) => return,
            }
        }
    });
    let mut e2e = Vec::new();
    let mut infer = Vec::new();
    let mut ready = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(300);
    while e2e.len() < n + s.warmup && Instant::now() < deadline {
        let Ok((received, payload)) = rx.recv_timeout(Duration::from_secs(30)) else { break };
        let v: serde_json::Value = serde_json::from_slice(&payload).unwrap();
        let captured = humantime::parse_rfc3339(v["captured_at"].as_str().unwrap()).unwrap();
        let ms = received.duration_since(captured).map(|d| d.as_secs_f64() * 1000.0).unwrap_or(0.0);
        e2e.push(ms);
        infer.push(v["latency_ms"]["inference"].as_f64().unwrap_or(f64::NAN));
        ready.push(v["latency_ms"]["total"].as_f64().unwrap_or(f64::NAN));
    }
    let rss = peak_rss_kb(daemon.id());
    let _ = Command::new("kill").args(["-TERM", &daemon.id().to_string()]).status();
    let _ = daemon.wait();
    let _ = std::fs::remove_dir_all(&dir);
    let mut e2e: Vec<f64> = e2e.into_iter().skip(s.warmup).collect();
    let mut infer: Vec<f64> = infer.into_iter().skip(s.warmup).collect();
    let mut ready: Vec<f64> = ready.into_iter().skip(s.warmup).collect();
    ready.sort_by(|a, b| a.total_cmp(b));
    if e2e.is_empty() {
        println!("| {} | no results received | | | | | |", s.name);
        return;
    }
    e2e.sort_by(|a, b| a.total_cmp(b));
    infer.sort_by(|a, b| a.total_cmp(b));
    let bare = bare_p50(bin, &model);
    let (p50, p99) = (percentile(&e2e, 50.0), percentile(&e2e, 99.0));
    let infer_p50 = percentile(&infer, 50.0);
    // What is not the model, measured in the same process: e2e minus the daemon's own inference time.
    let overhead = p50 - infer_p50;
    println!(
        "| {} | {} | {:.3} | {:.3} | {:.3} | {:.3} | {:.3} | {:.3} ms ({:.1} % of inference) | {:.3} ms | {} |",
        s.name,
        e2e.len(),
        p50,
        p99,
        percentile(&ready, 50.0),
        infer_p50,
        bare,
        overhead,
        100.0 * overhead / infer_p50,
        p50 - bare,
        rss.map(|kb| format!("{:.1} MiB", kb as f64 / 1024.0)).unwrap_or_else(|| "?".into())
    );
}

fn main() {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    let bin = std::env::var_os("EDGEINFER").map(PathBuf::from).unwrap_or_else(|| root.join("target/release/edgeinfer"));
    if !bin.exists() {
        eprintln!("{} not found: run `cargo build --release` first", bin.display());
        std::process::exit(2);
    }
    let n: usize = std::env::var("E2E_RESULTS").ok().and_then(|v| v.parse().ok()).unwrap_or(200);
    let scenarios = [
        Scenario {
            name: "sensor",
            model: "vibration_int8.onnx",
            source: "{ type = \"synthetic\", signal = \"vibration\", rate_hz = 1000 }",
            warmup: 5,
        },
        Scenario {
            name: "mobilenetv2",
            model: "mobilenetv2_int8.onnx",
            source: "{ type = \"synthetic\", signal = \"frames\", width = 224, height = 224, fps = 10 }\npostprocess = { type = \"classify\", top_k = 3 }",
            warmup: 5,
        },
    ];
    println!("edgeinfer daemon end to end: synthetic source -> model -> embedded broker -> subscriber (loopback)");
    println!("{} results per scenario after warm-up; latency = subscriber receipt - capture time\n", n);
    println!("| scenario | results | e2e p50 ms | e2e p99 ms | capture to result ready p50 ms | in-daemon inference p50 ms | bare `bench` p50 ms | overhead: e2e p50 - in-daemon inference p50 | e2e p50 - bare p50 | daemon peak RSS |");
    println!("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|");
    for s in &scenarios {
        run(&bin, &root, s, n);
    }
}
