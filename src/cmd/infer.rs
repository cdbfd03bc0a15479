//! `edgeinfer infer`: one-shot and batch inference on files, and the raw
//! tensor mode (`--npy` in, `--save-npy` out) for parity checks. Classifiers
//! print top-k classes; detectors (found from their output shapes) print boxes.

use std::io::{IsTerminal, Write};
use std::path::{Path, PathBuf};
use std::time::Instant;

use thiserror::Error;

use crate::engine::{EngineError, LoadOptions, Model, Session};
use crate::postprocess::detect::Detector;
use crate::postprocess::{self, Softmax};
use crate::preprocess::{self, ImageGeometry, ImagePrep};
use crate::tensor::Tensor;

/// Errors that stop `infer` as a whole (one bad file in a batch does not).
#[derive(Debug, Error)]
pub enum InferError {
    /// The engine refused the inputs or failed.
    #[error(transparent)]
    Engine(#[from] EngineError),
    /// The arguments do not fit the model.
    #[error("{0}")]
    Usage(String),
    /// A file could not be read or written.
    #[error("{path}: {reason}")]
    File {
        /// The file.
        path: String,
        /// Why.
        reason: String,
    },
}

/// What to infer on and how to present it.
#[derive(Debug, Clone, Default)]
pub struct InferArgs {
    /// Image, `.npy` or `.json` files, directories, or literal JSON arrays.
    pub inputs: Vec<String>,
    /// Raw tensors fed to the inputs in graph order.
    pub npy: Vec<PathBuf>,
    /// Directory for `out0.npy`, `out1.npy`, ... in raw mode.
    pub save_npy: Option<PathBuf>,
    /// Image preprocessing.
    pub prep: ImagePrep,
    /// Labels file; found next to the model when absent.
    pub labels: Option<PathBuf>,
    /// Classes to report.
    pub top_k: Option<usize>,
    /// Print raw outputs instead of classes.
    pub raw: bool,
    /// Softmax policy for class scores.
    pub softmax: Softmax,
}

/// Counts of a batch run.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct InferSummary {
    /// Inputs that gave a result.
    pub ok: usize,
    /// Inputs reported and skipped.
    pub failed: usize,
}

/// Loads `model` for raw tensor mode: the `.npy` files' shapes pin every
/// input the caller did not pin with `--input-shape` (its symbolic
/// dimensions, batch included), so an exported model with dynamic axes runs
/// on the arrays as they are. A fixed dimension an array does not match is an
/// error naming the input and the dimension (the engine's check).
pub fn load_for_npy(model: &Path, opts: &LoadOptions, npy: &[PathBuf]) -> Result<Model, InferError> {
    let shapes: Vec<Vec<usize>> = npy
        .iter()
        .map(|p| {
            Tensor::read_npy(p)
                .map(|t| t.shape.clone())
                .map_err(|e| InferError::File { path: p.display().to_string(), reason: e.to_string() })
        })
        .collect::<Result<_, _>>()?;
    let pinned_by_caller = |index: usize, name: &str| {
        opts.input_shapes.contains_key(name) || (index == 0 && opts.input_shapes.contains_key(""))
    };
    // Names come from the first attempt: the inputs it could not pin, or the
    // loaded model's whose shape differs from its array's.
    let (first, names): (Option<Model>, Vec<(usize, String)>) = match Model::load(model, opts) {
        Ok(m) => {
            let differ: Vec<(usize, String)> = m
                .inputs()
                .iter()
                .enumerate()
                .filter(|(i, spec)| shapes.get(*i).is_some_and(|s| *s != spec.shape))
                .map(|(i, spec)| (i, spec.name.clone()))
                .collect();
            if differ.is_empty() {
                return Ok(m);
            }
            (Some(m), differ)
        }
        Err(EngineError::Unpinned { inputs, .. }) => (None, inputs.into_iter().map(|u| (u.index, u.input)).collect()),
        Err(e) => return Err(e.into()),
    };
    let mut opts = opts.clone();
    for (index, name) in names {
        if let Some(shape) = shapes.get(index).filter(|_| !pinned_by_caller(index, &name)) {
            opts.input_shapes.insert(name, shape.clone());
        }
    }
    match (Model::load(model, &opts), first) {
        (Ok(m), _) => Ok(m),
        // An array that does not fit a fixed shape: the model as loaded
        // first, whose run names the input and the shape it takes.
        (Err(_), Some(m)) => Ok(m),
        (Err(e), None) => Err(e.into()),
    }
}

/// Feeds `.npy` files to the inputs in graph order, writes every output to
/// `DIR/out<i>.npy` and prints one JSON line describing them.
pub fn run_raw(model: &Model, args: &InferArgs, out: &mut dyn Write) -> Result<InferSummary, InferError> {
    let specs = model.inputs();
    if args.npy.len() != specs.len() {
        let names: Vec<_> = specs.iter().map(|s| s.name.as_str()).collect();
        return Err(InferError::Usage(format!(
            "the model takes {} input(s) {names:?}; {} --npy file(s) given",
            specs.len(),
            args.npy.len()
        )));
    }
    let mut tensors = Vec::new();
    for (spec, path) in specs.iter().zip(&args.npy) {
        let t = Tensor::read_npy(path)
            .map_err(|e| InferError::File { path: path.display().to_string(), reason: e.to_string() })?;
        if t.elem_type() != spec.elem_type {
            return Err(InferError::Usage(format!(
                "{}: holds {} values, input `{}` takes {} (convert with arr.astype(...))",
                path.display(),
                t.elem_type(),
                spec.name,
                spec.elem_type
            )));
        }
        tensors.push(t);
    }
    let mut session = model.session()?;
    let t = Instant::now();
    let outputs = session.run(&tensors)?;
    let inference_ms = t.elapsed().as_secs_f64() * 1000.0;
    let mut described = Vec::new();
    if let Some(dir) = &args.save_npy {
        std::fs::create_dir_all(dir)
            .map_err(|e| InferError::File { path: dir.display().to_string(), reason: e.to_string() })?;
    }
    for (ix, (spec, t)) in model.outputs().iter().zip(&outputs).enumerate() {
        let mut d = serde_json::json!({"name": spec.name, "shape": t.shape, "type": t.elem_type()});
        if let Some(dir) = &args.save_npy {
            let file = dir.join(format!("out{ix}.npy"));
            t.write_npy(&file)
                .map_err(|e| InferError::File { path: file.display().to_string(), reason: e.to_string() })?;
            d["file"] = serde_json::Value::from(file.display().to_string());
        } else {
            d["value"] = t.to_json();
        }
        described.push(d);
    }
    let line = serde_json::json!({"model": model.info().name, "inference_ms": inference_ms, "outputs": described});
    writeln!(out, "{line}").map_err(|e| InferError::File { path: "stdout".into(), reason: e.to_string() })?;
    Ok(InferSummary { ok: 1, failed: 0 })
}

enum Item {
    File(PathBuf),
    Literal(String),
}

fn expand_inputs(inputs: &[String]) -> Result<Vec<Item>, InferError> {
    let mut items = Vec::new();
    for raw in inputs {
        if raw.trim_start().starts_with('[') {
            items.push(Item::Literal(raw.clone()));
            continue;
        }
        let path = PathBuf::from(raw);
        if path.is_dir() {
            let mut files: Vec<PathBuf> = std::fs::read_dir(&path)
                .map_err(|e| InferError::File { path: raw.clone(), reason: e.to_string() })?
                .filter_map(|e| e.ok().map(|e| e.path()))
                .filter(|p| p.is_file() && !p.file_name().is_some_and(|n| n.to_string_lossy().starts_with('.')))
                .collect();
            files.sort();
            items.extend(files.into_iter().map(Item::File));
        } else {
            items.push(Item::File(path));
        }
    }
    Ok(items)
}

/// Turns one file or literal into the model's input tensor, with the image geometry for images.
pub fn load_input(model: &Model, item: &str, prep: &ImagePrep) -> Result<(Tensor, Option<ImageGeometry>), String> {
    let spec = &model.inputs()[0];
    if item.trim_start().starts_with('[') {
        let v: serde_json::Value = serde_json::from_str(item).map_err(|e| format!("invalid JSON: {e}"))?;
        let t = Tensor::from_json(&v).map_err(|e| e.to_string())?;
        return preprocess::array_to_tensor(&t, spec).map(|t| (t, None)).map_err(|e| e.to_string());
    }
    let path = Path::new(item);
    let ext = path.extension().map(|e| e.to_string_lossy().to_lowercase()).unwrap_or_default();
    match ext.as_str() {
        "jpg" | "jpeg" | "png" => {
            let bytes = std::fs::read(path).map_err(|e| e.to_string())?;
            let img = preprocess::decode_image(&bytes).map_err(|e| e.to_string())?;
            preprocess::image_to_tensor_with_geometry(&img, spec, prep)
                .map(|(t, g)| (t, Some(g)))
                .map_err(|e| e.to_string())
        }
        "npy" => {
            let t = Tensor::read_npy(path).map_err(|e| e.to_string())?;
            preprocess::array_to_tensor(&t, spec).map(|t| (t, None)).map_err(|e| e.to_string())
        }
        "json" => {
            let text = std::fs::read_to_string(path).map_err(|e| e.to_string())?;
            let v: serde_json::Value = serde_json::from_str(&text).map_err(|e| format!("invalid JSON: {e}"))?;
            let t = Tensor::from_json(&v).map_err(|e| e.to_string())?;
            preprocess::array_to_tensor(&t, spec).map(|t| (t, None)).map_err(|e| e.to_string())
        }
        _ => Err("unsupported input (use .jpg, .png, .npy, .json or a JSON array)".into()),
    }
}

struct Presenter {
    labels: Vec<String>,
    top_k: Option<usize>,
    softmax: Softmax,
    /// Set when the outputs look like a detector's and none like class scores.
    detector: Option<Detector>,
}

impl Presenter {
    fn new(model: &Model, args: &InferArgs) -> Result<Self, InferError> {
        let labels_path = args.labels.clone().or_else(|| postprocess::find_labels(&model.info().path));
        let labels = match &labels_path {
            Some(p) => postprocess::read_labels(p)
                .map_err(|e| InferError::File { path: p.display().to_string(), reason: e.to_string() })?,
            None => Vec::new(),
        };
        let classify = !args.raw && (args.top_k.is_some() || labels_path.is_some());
        let top_k = classify.then(|| args.top_k.unwrap_or(5));
        let class_shaped = model.outputs().iter().any(|o| o.shape.len() == 2 && o.shape[0] == 1 && o.shape[1] >= 2);
        // A labels file whose length fits a detector layout is what tells a detector from, say,
        // an autoencoder with a 3-D output.
        let detector = if args.raw || class_shaped || labels.is_empty() {
            None
        } else {
            // Default settings (min_score 0.25, IoU 0.45); the daemon's config takes the rest.
            let defaults: crate::postprocess::config::DetectConfig = toml::from_str("").expect("defaults parse");
            Detector::new(&defaults, model.outputs(), &labels).ok()
        };
        Ok(Presenter { labels, top_k, softmax: args.softmax, detector })
    }

    fn result(&mut self, model: &Model, outputs: &[Tensor], geometry: Option<&ImageGeometry>) -> serde_json::Value {
        if let (Some(det), Some(g)) = (self.detector.as_mut(), geometry) {
            match det.decode(outputs, g) {
                Ok(found) => {
                    return serde_json::json!({
                        "detections": found,
                        "image": {"width": g.source.0, "height": g.source.1},
                    })
                }
                Err(e) => log::warn!("detections: {e}; printing the raw outputs"),
            }
        }
        if let Some(k) = self.top_k {
            if let Some((_, scores)) = postprocess::class_scores(outputs, self.softmax) {
                return serde_json::json!({"top": postprocess::top_k(&scores, k, &self.labels)});
            }
        }
        let mut map = serde_json::Map::new();
        for (spec, t) in model.outputs().iter().zip(outputs) {
            map.insert(spec.name.clone(), t.to_json());
        }
        serde_json::json!({"outputs": map})
    }
}

/// Runs the model on each input (files, directories, JSON literals), one
/// JSON line per input on `out`; bad inputs are reported on `err` and skipped.
pub fn run_files(
    model: &Model,
    args: &InferArgs,
    out: &mut dyn Write,
    err: &mut dyn Write,
) -> Result<InferSummary, InferError> {
    if model.inputs().len() != 1 {
        let names: Vec<_> = model.inputs().iter().map(|s| s.name.as_str()).collect();
        return Err(InferError::Usage(format!(
            "the model takes {} inputs {names:?}; feed them with --npy FILE for each, in that order",
            model.inputs().len()
        )));
    }
    if args.inputs.is_empty() {
        return Err(InferError::Usage(
            "no input given: name image, .npy or .json files, a directory, or use --npy".into(),
        ));
    }
    let mut presenter = Presenter::new(model, args)?;
    let items = expand_inputs(&args.inputs)?;
    let show_progress = items.len() > 1 && std::io::stderr().is_terminal();
    let mut session: Session = model.session()?;
    let mut outputs = Vec::new();
    let mut summary = InferSummary::default();
    let mut times = Vec::new();
    let io = |e: std::io::Error| InferError::File { path: "stdout".into(), reason: e.to_string() };
    for (n, item) in items.iter().enumerate() {
        let name = match item {
            Item::File(p) => p.display().to_string(),
            Item::Literal(s) => s.clone(),
        };
        let result = load_input(model, &name, &args.prep).and_then(|(input, geometry)| {
            let t = Instant::now();
            session.run_into(std::slice::from_ref(&input), &mut outputs).map_err(|e| e.to_string())?;
            Ok((t.elapsed().as_secs_f64() * 1000.0, geometry))
        });
        match result {
            Ok((ms, geometry)) => {
                times.push(ms);
                let mut line = presenter.result(model, &outputs, geometry.as_ref());
                line["input"] = serde_json::Value::from(name);
                line["inference_ms"] = crate::tensor::json_number(ms);
                writeln!(out, "{line}").map_err(io)?;
                summary.ok += 1;
            }
            Err(e) => {
                if show_progress {
                    write!(err, "\r\x1b[K").map_err(io)?;
                }
                writeln!(err, "error: {name}: {e}").map_err(io)?;
                summary.failed += 1;
            }
        }
        if show_progress {
            let width = 30;
            let done = (n + 1) * width / items.len();
            write!(
                err,
                "\r[{}{}] {}/{} ({} failed)",
                "#".repeat(done),
                ".".repeat(width - done),
                n + 1,
                items.len(),
                summary.failed
            )
            .map_err(io)?;
        }
    }
    if show_progress {
        writeln!(err).map_err(io)?;
    }
    if items.len() > 1 {
        times.sort_by(|a, b| a.total_cmp(b));
        let p50 = crate::stats::percentile(&times, 50.0);
        writeln!(
            err,
            "{} inputs: {} ok, {} failed; inference p50 {:.3} ms",
            items.len(),
            summary.ok,
            summary.failed,
            p50
        )
        .map_err(io)?;
    }
    Ok(summary)
}
