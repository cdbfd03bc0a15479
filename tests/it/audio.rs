//! Audio preprocessing against librosa's numbers (models/make_audio_ref.py),
//! through the pipeline's `Preprocessor` as a pipe source would feed it, its
//! allocation on the hot path and its config errors; and Silero VAD (from its
//! PyPI wheel, models/fetch_vad.py) in tract and in the daemon, against
//! onnxruntime's probabilities.

use std::path::Path;
use std::time::{Duration, Instant};

use edgeinfer::config::{Config, PreprocessConfig, SourceConfig};
use edgeinfer::engine::{LoadOptions, Model, TensorSpec};
use edgeinfer::message::{Input, Values};
use edgeinfer::preprocess::audio::{AudioConfig, AudioPlan, FeatureLayout, LogMel};
use edgeinfer::preprocess::stage::Preprocessor;
use edgeinfer::tensor::{Data, ElemType, Tensor};

/// Largest difference from librosa accepted, in dB (ln cases are converted to dB).
const BOUND_DB: f32 = 0.01;

/// Mono 16-bit PCM from a WAV file, scaled by 1/32768 as the pipe source scales s16le.
pub fn read_wav_mono16(path: &Path) -> (u32, Vec<f32>) {
    let bytes = std::fs::read(path).unwrap();
    assert!(bytes.len() > 12 && &bytes[..4] == b"RIFF" && &bytes[8..12] == b"WAVE", "{} is no WAV", path.display());
    let (mut at, mut rate, mut data) = (12, 0, None);
    while at + 8 <= bytes.len() {
        let id = &bytes[at..at + 4];
        let len = u32::from_le_bytes(bytes[at + 4..at + 8].try_into().unwrap()) as usize;
        let body = &bytes[at + 8..(at + 8 + len).min(bytes.len())];
        if id == b"fmt " {
            let (format, channels, bits) = (
                u16::from_le_bytes([body[0], body[1]]),
                u16::from_le_bytes([body[2], body[3]]),
                u16::from_le_bytes([body[14], body[15]]),
            );
            assert_eq!((format, channels, bits), (1, 1, 16), "{}: only mono 16-bit PCM", path.display());
            rate = u32::from_le_bytes(body[4..8].try_into().unwrap());
        } else if id == b"data" {
            data = Some(body.chunks_exact(2).map(|b| i16::from_le_bytes([b[0], b[1]]) as f32 / 32768.0).collect());
        }
        at += 8 + len + (len & 1);
    }
    (rate, data.expect("a data chunk"))
}

fn pipe_source(channels: usize) -> SourceConfig {
    toml::from_str(&format!(
        "type = \"pipe\"\ncommand = [\"arecord\", \"-f\", \"S16_LE\", \"-r\", \"16000\", \"-t\", \"raw\"]\n\
         format = \"s16le\"\nsample_rate = 16000\nchannels = {channels}"
    ))
    .unwrap()
}

fn spec(shape: &[usize]) -> TensorSpec {
    TensorSpec { name: "features".into(), shape: shape.to_vec(), elem_type: ElemType::F32, quantization: None }
}

fn chunk(values: &[f32]) -> Input {
    Input::Values(Values { values: values.to_vec(), names: None, captured: std::time::SystemTime::now(), origin: None })
}

fn load_cases() -> (Vec<f32>, Vec<serde_json::Value>) {
    let dir = crate::model("ref/logmel");
    let meta: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("cases.json")).unwrap()).unwrap();
    let (rate, signal) = read_wav_mono16(&crate::model(meta["wav"].as_str().unwrap()));
    assert_eq!(rate, 16000);
    (signal, meta["cases"].as_array().unwrap().clone())
}

fn max_abs_diff(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len());
    a.iter().zip(b).map(|(x, y)| (x - y).abs()).fold(0.0, f32::max)
}

#[test]
fn log_mel_matches_librosa() {
    let (signal, cases) = load_cases();
    assert!(cases.len() >= 4);
    for case in &cases {
        let name = case["name"].as_str().unwrap();
        let cfg: AudioConfig = serde_json::from_value(case["preprocess"].clone()).unwrap();
        let plan = AudioPlan::resolve(&cfg, &pipe_source(1).output()).unwrap();
        let mel = plan.mel.clone().unwrap();
        let reference = Tensor::read_npy(&crate::model(&format!("ref/logmel/{name}.npy"))).unwrap();
        let (frames, n_mels) = plan.feature_shape().unwrap();
        assert_eq!(reference.shape, vec![n_mels, frames], "{name}: frame count or n_mels differ from librosa");
        let Data::F32(want) = reference.data else { panic!("{name}: f32 reference") };
        let mut got = vec![0.0; frames * n_mels];
        LogMel::new(&mel).compute(&signal[signal.len() - plan.window..], &mut got, FeatureLayout::MelsFrames);
        let to_db = if case["preprocess"]["log"] == "ln" { 10.0 / std::f32::consts::LN_10 } else { 1.0 };
        let diff_db = max_abs_diff(&got, &want) * to_db;
        eprintln!("log-mel vs librosa, {name} [{n_mels} x {frames}]: max |diff| = {diff_db:.2e} dB");
        assert!(diff_db < BOUND_DB, "{name}: {diff_db} dB from librosa ({})", case["librosa"]);
    }
}

#[test]
fn pipe_chunks_through_the_preprocessor_give_librosa_windows() {
    let (signal, _) = load_cases();
    let want = Tensor::read_npy(&crate::model("ref/logmel/kws_default_db.npy")).unwrap();
    let Data::F32(want) = want.data else { panic!() };
    let cfg: PreprocessConfig =
        toml::from_str("type = \"audio\"\nwindow_ms = 1000\nhop_ms = 500\nfeatures = \"log_mel\"").unwrap();
    // Stereo with the signal in both channels plus opposite offsets: the downmix cancels them.
    let stereo: Vec<f32> = signal.iter().chain(&signal).flat_map(|&x| [x + 0.25, x - 0.25]).collect();
    for (channels, input, shape) in
        [(1, signal.repeat(2), vec![1, 1, 40, 98]), (2, stereo, vec![1, 98, 40]), (1, signal.repeat(2), vec![1, 3920])]
    {
        let mut pre = Preprocessor::new(&cfg, &spec(&shape), &pipe_source(channels).output()).unwrap();
        let mut buf = pre.buffer();
        let mut windows = Vec::new();
        // 100 ms chunks, as the pipe source pushes them by default.
        for c in input.chunks(1600 * channels) {
            pre.feed(&chunk(c), &mut buf, |t, _| windows.push(t.clone())).unwrap();
        }
        // 2 s of audio, 1 s windows every 0.5 s: at 1 s, 1.5 s and 2 s.
        assert_eq!(windows.len(), 3, "{channels} channels, {shape:?}");
        let Data::F32(last) = &windows[2].data else { panic!() };
        let last_mels_frames: Vec<f32> = if shape == [1, 1, 40, 98] {
            last.clone()
        } else {
            (0..40).flat_map(|m| (0..98).map(move |t| last[t * 40 + m])).collect()
        };
        // The last window is the WAV itself: librosa's numbers.
        let diff = max_abs_diff(&last_mels_frames, &want);
        assert!(diff < BOUND_DB, "{channels} channels, {shape:?}: {diff} dB from librosa");
        assert_ne!(windows[1].data, windows[2].data, "the middle window straddles both copies");
    }
}

#[test]
fn log_mel_windows_do_not_allocate_and_report_their_time() {
    let (signal, _) = load_cases();
    let cfg: PreprocessConfig =
        toml::from_str("type = \"audio\"\nwindow_ms = 1000\nhop_ms = 100\nfeatures = \"log_mel\"").unwrap();
    let mut pre = Preprocessor::new(&cfg, &spec(&[1, 98, 40]), &pipe_source(1).output()).unwrap();
    let mut buf = pre.buffer();
    let chunks: Vec<Input> = signal.chunks(1600).map(chunk).collect();
    for c in &chunks {
        pre.feed(c, &mut buf, |_, _| {}).unwrap();
    }
    let mut windows = 0;
    let before = crate::alloc::allocs();
    for c in &chunks {
        pre.feed(c, &mut buf, |_, _| windows += 1).unwrap();
    }
    let allocated = crate::alloc::allocs() - before;
    assert_eq!(windows, 10, "a window every 100 ms chunk");
    assert_eq!(allocated, 0, "10 log-mel windows allocated {allocated} times");

    // Time per 1 s window (98 frames x 40 mels, n_fft 512): the median of a loop. Printed, not asserted.
    let plan = AudioPlan::resolve(
        &toml::from_str("window_ms = 1000\nfeatures = \"log_mel\"").unwrap(),
        &pipe_source(1).output(),
    )
    .unwrap();
    let mut mel = LogMel::new(plan.mel.as_ref().unwrap());
    let mut out = vec![0.0; 98 * 40];
    let mut times: Vec<Duration> = (0..51)
        .map(|_| {
            let t = Instant::now();
            mel.compute(&signal, &mut out, FeatureLayout::FramesMels);
            t.elapsed()
        })
        .collect();
    times.sort();
    let profile =
        if cfg!(debug_assertions) { "debug build: edgeinfer unoptimised, realfft optimised" } else { "release" };
    eprintln!(
        "log-mel per 1 s window (98 x 40): median {:.3} ms over 51 runs ({profile})",
        times[25].as_secs_f64() * 1e3
    );
}

#[test]
fn audio_config_errors_name_the_key() {
    let dir = tempfile::tempdir().unwrap();
    let model = crate::model("vibration_f32.onnx");
    let check = |source: &str, preprocess: &str| {
        let text = format!(
            "[[pipelines]]\nname = \"vad\"\nmodel = \"{}\"\nsource = {source}\npreprocess = {{ type = \"audio\", {preprocess} }}\n\
             [[pipelines.outputs]]\ntype = \"stdout\"\n",
            model.display()
        );
        let path = dir.path().join("c.toml");
        std::fs::write(&path, text).unwrap();
        Config::load(&path).err().map(|e| e.to_string())
    };
    let pipe = "{ type = \"pipe\", command = [\"arecord\"], format = \"s16le\" }";
    assert_eq!(check(pipe, "window_ms = 1000, features = \"log_mel\""), None);
    let e = check(pipe, "window_ms = 1000, features = \"log_mel\", n_mels = 0").unwrap();
    assert!(e.contains("pipelines[0].preprocess.n_mels"), "{e}");
    let e = check(pipe, "window_ms = 1000, n_fft = 512").unwrap();
    assert!(e.contains("pipelines[0].preprocess.n_fft") && e.contains("log_mel"), "{e}");
    let e = check("{ type = \"lines\" }", "window_ms = 1000").unwrap();
    assert!(e.contains("pipelines[0].preprocess.sample_rate"), "{e}");
    let e = check(pipe, "window_ms = 1000, sample_rate = 8000").unwrap();
    assert!(e.contains("preprocess.sample_rate") && e.contains("16000"), "{e}");
    let e = check(pipe, "window_ms = 1000, n_mel = 40").unwrap();
    assert!(e.contains("n_mel"), "{e}");
}

/// Largest difference from onnxruntime's speech probabilities accepted.
const VAD_BOUND: f32 = 1e-4;

#[test]
fn silero_sequence_model_runs_in_tract_like_onnxruntime() {
    let (rate, y) = read_wav_mono16(&crate::model("samples/speech16k.wav"));
    assert_eq!(rate, 16000);
    // 512-sample blocks, each prefixed by the previous block's last 64 samples (zeros first).
    let n = y.len() / 512;
    let blocks: Vec<f32> = (0..n)
        .flat_map(|b| {
            let context = if b == 0 { vec![0.0; 64] } else { y[b * 512 - 64..b * 512].to_vec() };
            context.into_iter().chain(y[b * 512..(b + 1) * 512].iter().copied())
        })
        .collect();
    let mut opts = LoadOptions::default();
    opts.input_shapes.insert("input".into(), vec![n, 576]);
    let model = Model::load(&crate::model("silero_vad_16k_sequence.onnx"), &opts).unwrap();
    let mut session = model.session().unwrap();
    let state = Tensor::from_f32(vec![1, 1, 128], vec![0.0; 128]).unwrap();
    let inputs = [Tensor::from_f32(vec![n, 576], blocks).unwrap(), state.clone(), state];
    let mut outputs = Vec::new();
    session.run_into(&inputs, &mut outputs).unwrap();
    let Data::F32(probs) = &outputs[0].data else { panic!("f32 speech_probs") };
    let Data::F32(want) = Tensor::read_npy(&crate::model("ref/vad/sequence_probs.npy")).unwrap().data else { panic!() };
    let diff = max_abs_diff(probs, &want);
    eprintln!("silero sequence model, {n} blocks: max |tract - onnxruntime| = {diff:.2e}");
    assert!(diff < VAD_BOUND, "{diff}");
    // The WAV: 1.5 s of quiet, speech from 1.5 s, quiet again for the last second.
    let mean = |from_s: f32, to_s: f32| {
        let (a, b) = ((from_s * 31.25) as usize, (to_s * 31.25) as usize);
        probs[a..b].iter().sum::<f32>() / (b - a) as f32
    };
    assert!(mean(0.2, 1.4) < 0.2 && mean(2.0, 3.0) > 0.8, "quiet {} speech {}", mean(0.2, 1.4), mean(2.0, 3.0));
}

/// Runs the daemon on speech16k.wav through a pipe (`tail` strips the WAV header) with the
/// Silero window model; returns its speech probabilities and onnxruntime's for the same windows.
fn vad_daemon_and_onnxruntime() -> (Vec<f64>, Vec<f64>) {
    let meta: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(crate::model("ref/vad/windows.json")).unwrap()).unwrap();
    let want: Vec<f64> =
        meta["windows"].as_array().unwrap().iter().map(|w| w["speech_prob"].as_f64().unwrap()).collect();
    // The WAV written by fetch_vad.py has a 44-byte header: `tail -c +45` is its raw s16le PCM.
    let wav = crate::model("samples/speech16k.wav");
    assert_eq!(&std::fs::read(&wav).unwrap()[36..40], b"data", "expected a plain 44-byte WAV header");
    let mut daemon = crate::support::Daemon::start(&format!(
        r#"
device = "vad-test"
[[pipelines]]
name = "vad"
model = "{{models}}/silero_vad_window16k.onnx"
source = {{ type = "pipe", command = ["tail", "-c", "+45", "{wav}"], format = "s16le", sample_rate = 16000, chunk_ms = 64, restart = false }}
preprocess = {{ type = "audio", window_ms = 1024, hop_ms = 512 }}
postprocess = {{ type = "values" }}
  [[pipelines.outputs]]
  type = "stdout"
"#,
        wav = wav.display()
    ));
    let deadline = Instant::now() + Duration::from_secs(30);
    while daemon.stdout().lines().count() < want.len() && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(50));
    }
    daemon.signal("TERM");
    assert_eq!(daemon.wait(Duration::from_secs(10)), Some(0), "stderr: {}", daemon.stderr());
    let lines: Vec<serde_json::Value> = daemon.stdout().lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    assert_eq!(lines.len(), want.len(), "one result per 1024 ms window every 512 ms; stderr: {}", daemon.stderr());
    let got: Vec<f64> = lines.iter().map(|l| l["result"]["values"][0].as_f64().unwrap()).collect();
    eprintln!("silero window model in the daemon: {got:.4?}\n                      onnxruntime: {want:.4?}");
    (got, want)
}

#[test]
fn daemon_runs_silero_vad_on_a_pipe() {
    let (got, want) = vad_daemon_and_onnxruntime();
    // The first window after load runs from the model's zero LSTM state, as onnxruntime does.
    assert!((got[0] - want[0]).abs() < VAD_BOUND as f64, "first window {} vs onnxruntime {}", got[0], want[0]);
    // Quiet first (speech starts at 1.5 s), speech in the middle, quiet at the end: as onnxruntime says.
    for (i, (g, w)) in got.iter().zip(&want).enumerate() {
        assert_eq!(*g > 0.5, *w > 0.5, "window {i}: daemon {g}, onnxruntime {w}");
    }
    assert!(got[0] < 0.5 && got[3] > 0.5 && got[got.len() - 1] < 0.5, "{got:?}");
}

/// Also guards the engine's per-run reset of stateful ops (tract keeps a Scan's
/// hidden state across runs of one session unless it is restored).
#[test]
fn daemon_silero_windows_all_match_onnxruntime() {
    let (got, want) = vad_daemon_and_onnxruntime();
    let diff = got.iter().zip(&want).map(|(a, b)| (a - b).abs()).fold(0.0, f64::max);
    assert!(diff < VAD_BOUND as f64, "max |daemon - onnxruntime| = {diff}: {got:?} vs {want:?}");
}
