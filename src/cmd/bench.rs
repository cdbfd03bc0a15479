//! `edgeinfer bench`: on-device latency and memory figures, the ones LiteRT's
//! benchmark_model prints, so users can compare boards and runtimes.

use std::io::Write;
use std::path::Path;
use std::time::Instant;

use crate::engine::{EngineError, LoadOptions, Model, TensorSpec};
use crate::stats::percentile;
use crate::tensor::{Data, ElemType, Tensor};

/// What `bench` measured; also its `--json` output.
#[derive(Debug, Clone, serde::Serialize)]
pub struct BenchReport {
    /// Model name (file stem).
    pub model: String,
    /// Model file.
    pub path: String,
    /// Timed runs.
    pub runs: usize,
    /// Warm-up runs.
    pub warmup: usize,
    /// Threads used by the engine.
    pub threads: usize,
    /// Where the graph came from: `onnx`, `cache` or `converted`.
    pub origin: String,
    /// What the start-up cache did, when `--cache-dir` was given.
    pub cache: Option<String>,
    /// Load + optimise time.
    pub init_ms: f64,
    /// The first inference on a fresh session.
    pub first_inference_ms: f64,
    /// Start-up: load + optimise + first inference.
    pub startup_ms: f64,
    /// Mean of the warm-up runs.
    pub warmup_mean_ms: f64,
    /// Median of the timed runs.
    pub p50_ms: f64,
    /// 90th percentile.
    pub p90_ms: f64,
    /// 99th percentile.
    pub p99_ms: f64,
    /// Mean.
    pub mean_ms: f64,
    /// Fastest run.
    pub min_ms: f64,
    /// Peak resident memory of the process.
    pub peak_rss_kb: Option<u64>,
}

/// Deterministic pseudo-random inputs in [0, 1) (integers: zeros), so runs are comparable.
pub fn synthetic_input(spec: &TensorSpec, seed: u64) -> Tensor {
    let n: usize = spec.shape.iter().product();
    let mut state = seed.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
    let mut next = || {
        state = state.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
        ((state >> 40) as f32) / (1u64 << 24) as f32
    };
    let data = match spec.elem_type {
        ElemType::F32 => Data::F32((0..n).map(|_| next()).collect()),
        ElemType::F64 => Data::F64((0..n).map(|_| next() as f64).collect()),
        ElemType::U8 => Data::U8((0..n).map(|_| (next() * 255.0) as u8).collect()),
        ElemType::I8 => Data::I8((0..n).map(|_| (next() * 255.0 - 128.0) as i8).collect()),
        ElemType::I16 => Data::I16(vec![0; n]),
        ElemType::I32 => Data::I32(vec![0; n]),
        ElemType::I64 => Data::I64(vec![0; n]),
        ElemType::Bool => Data::Bool(vec![false; n]),
        ElemType::String => Data::String(vec![String::new(); n]),
    };
    Tensor { shape: spec.shape.clone(), data }
}

/// Loads the model, then times a first inference, `warmup` runs and `runs` timed runs.
pub fn measure(path: &Path, opts: &LoadOptions, runs: usize, warmup: usize) -> Result<BenchReport, EngineError> {
    let mut opts = opts.clone();
    opts.skip_warmup = true;
    let model = Model::load(path, &opts)?;
    let inputs: Vec<Tensor> = model.inputs().iter().enumerate().map(|(i, s)| synthetic_input(s, i as u64)).collect();
    let mut session = model.session()?;
    let mut outputs = Vec::new();
    let t = Instant::now();
    session.run_into(&inputs, &mut outputs)?;
    let first_inference_ms = t.elapsed().as_secs_f64() * 1000.0;
    let t = Instant::now();
    for _ in 0..warmup {
        session.run_into(&inputs, &mut outputs)?;
    }
    let warmup_mean_ms = if warmup > 0 { t.elapsed().as_secs_f64() * 1000.0 / warmup as f64 } else { 0.0 };
    let mut samples = Vec::with_capacity(runs);
    for _ in 0..runs.max(1) {
        let t = Instant::now();
        session.run_into(&inputs, &mut outputs)?;
        samples.push(t.elapsed().as_secs_f64() * 1000.0);
    }
    let mean_ms = samples.iter().sum::<f64>() / samples.len() as f64;
    samples.sort_by(|a, b| a.total_cmp(b));
    let info = model.info();
    Ok(BenchReport {
        model: info.name.clone(),
        path: path.display().to_string(),
        runs: samples.len(),
        warmup,
        threads: info.threads,
        origin: info.origin.to_string(),
        cache: info.cache.clone(),
        init_ms: info.timings.init_ms(),
        first_inference_ms,
        startup_ms: info.timings.init_ms() + first_inference_ms,
        warmup_mean_ms,
        p50_ms: percentile(&samples, 50.0),
        p90_ms: percentile(&samples, 90.0),
        p99_ms: percentile(&samples, 99.0),
        mean_ms,
        min_ms: samples[0],
        peak_rss_kb: crate::stats::peak_rss_kb(),
    })
}

/// Prints the report as a table or JSON.
pub fn print(r: &BenchReport, json: bool, out: &mut dyn Write) -> std::io::Result<()> {
    if json {
        return writeln!(out, "{}", serde_json::to_string(r).unwrap_or_default());
    }
    writeln!(out, "model               {} ({})", r.model, r.path)?;
    writeln!(out, "threads             {}", r.threads)?;
    match &r.cache {
        Some(c) => writeln!(out, "loaded from         {} (cache: {c})", r.origin)?,
        None => writeln!(out, "loaded from         {}", r.origin)?,
    }
    writeln!(out, "init (load+opt)     {:.2} ms", r.init_ms)?;
    writeln!(out, "first inference     {:.3} ms", r.first_inference_ms)?;
    writeln!(out, "start-up            {:.2} ms (init + first inference)", r.startup_ms)?;
    writeln!(out, "warm-up mean        {:.3} ms ({} runs)", r.warmup_mean_ms, r.warmup)?;
    writeln!(
        out,
        "steady state        p50 {:.3} ms  p90 {:.3} ms  p99 {:.3} ms  mean {:.3} ms  min {:.3} ms ({} runs)",
        r.p50_ms, r.p90_ms, r.p99_ms, r.mean_ms, r.min_ms, r.runs
    )?;
    match r.peak_rss_kb {
        Some(kb) => writeln!(out, "peak RSS            {:.1} MiB", kb as f64 / 1024.0),
        None => writeln!(out, "peak RSS            unknown"),
    }
}
