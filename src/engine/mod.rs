//! The inference engine: the only module that imports tract.
//!
//! Loading an ONNX model (`onnx`) is: read the file once (hashing it), decode
//! the protobuf, expand QOperator nodes tract lacks (`rewrite`), check every
//! operator is known, pin every input to a concrete shape and build tract's
//! typed graph. A converted model (`converted`: NNEF made by `edgeinfer
//! convert`, or a start-up `cache` entry) gives the same typed graph without
//! the ONNX parser. Either way the graph is then optimised and planned once,
//! after our own operators replace tract's where the CPU suits them: 3x3
//! and 5x5 depthwise convolutions (`depthwise`), int8 convolutions on integer
//! kernels (`int8_conv`, one block loop per instruction set, chosen by
//! `isa`; `layout` keeps an int8 graph channels-first for them on aarch64)
//! and float 1x1 convolutions (`pointwise`).
//! A [`Model`] is shareable across threads; each worker makes its own
//! [`Session`], which keeps tract's execution state and the input buffers
//! between runs.
//!
//! `symbolic` reads an ONNX model's shapes as declared, symbolic dimensions
//! by name, without pinning (for `inspect`), and names the dimensions a load
//! is still missing, with a shape to paste.
//!
//! Only `onnx`, `proto` and `rewrite` need `tract-onnx` (the `onnx` feature);
//! this file, `converted` and `cache` use tract-core, tract-nnef and
//! tract-onnx-opl, so a build without the feature still runs converted models.

mod cache;
mod converted;
mod depthwise;
mod dyn_quant;
mod epilogue;
mod int8_conv;
pub mod isa;
mod layout;
mod nnef_ops;
#[cfg(feature = "onnx")]
mod onnx;
mod pointwise;
#[cfg(feature = "onnx")]
mod proto;
mod quant_dequant;
#[cfg(feature = "onnx")]
mod rewrite;
pub mod symbolic;

use std::collections::{BTreeMap, HashMap};
use std::io::Read;
use std::panic::AssertUnwindSafe;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use sha2::{Digest, Sha256};
use thiserror::Error;
use tract_core::plan::SimplePlan;
use tract_core::prelude::{
    tvec, DatumType, IntoTValue, RunOptions, TValue, Tensor as TTensor, TractError, TractResult, TypedModel,
    TypedRunnableModel, TypedSimpleState,
};
use tract_linalg::multithread::Executor;

use crate::tensor::{Data, ElemType, Tensor};

pub use converted::is_converted;
pub use symbolic::{describe, ShapeDim};

/// Errors from loading or running a model. Each renders as one line.
#[derive(Debug, Error)]
pub enum EngineError {
    /// The model file could not be read.
    #[error("{path}: cannot read model: {reason}")]
    Io {
        /// The model file.
        path: String,
        /// The OS error.
        reason: String,
    },
    /// The bytes are not an ONNX model.
    #[error("{path}: not a valid ONNX model ({reason})")]
    Decode {
        /// The model file.
        path: String,
        /// What the decoder said.
        reason: String,
    },
    /// An operator tract cannot run and we cannot rewrite.
    #[error("{path}: operator `{op}`{domain} in node `{node}` is not supported by the engine (tract {tract})")]
    UnsupportedOp {
        /// The model file.
        path: String,
        /// The operator type.
        op: String,
        /// ` (domain X)` or empty.
        domain: String,
        /// The node's name.
        node: String,
        /// tract's version.
        tract: &'static str,
    },
    /// An input shape cannot be pinned.
    #[error("{path}: input `{input}`: {reason}")]
    Shape {
        /// The model file.
        path: String,
        /// The input tensor's name.
        input: String,
        /// Why.
        reason: String,
    },
    /// Inputs with symbolic dimensions that neither the given shapes nor the batch pin.
    #[error("{path}: {}", symbolic::unpinned_message(.inputs))]
    Unpinned {
        /// The model file.
        path: String,
        /// Each such input, with its declared shape.
        inputs: Vec<symbolic::Unpinned>,
    },
    /// tract refused the model during analysis or optimisation.
    #[error("{path}: cannot load model: {reason}")]
    Load {
        /// The model file.
        path: String,
        /// tract's error chain on one line.
        reason: String,
    },
    /// A converted model (`.nnef.tgz` / `.nnef.tar`) that cannot be read or written.
    #[error("{path}: converted model: {reason}")]
    Converted {
        /// The converted file.
        path: String,
        /// Why.
        reason: String,
    },
    /// A tensor handed to `run` does not fit the model.
    #[error("input `{input}`: {reason}")]
    Input {
        /// The input tensor's name.
        input: String,
        /// Why it does not fit.
        reason: String,
    },
    /// Inference itself failed.
    #[error("inference failed: {0}")]
    Run(String),
}

/// Name, shape and element type of a model input or output.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct TensorSpec {
    /// Tensor name in the graph.
    pub name: String,
    /// Concrete shape (inputs are pinned at load).
    pub shape: Vec<usize>,
    /// Element type.
    #[serde(rename = "type")]
    pub elem_type: ElemType,
    /// Quantization next to this tensor: for an input the QuantizeLinear it
    /// feeds, for an output the DequantizeLinear that makes it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub quantization: Option<QuantParams>,
}

/// A per-tensor affine quantization: `real = scale * (q - zero_point)`.
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct QuantParams {
    /// Step size.
    pub scale: f32,
    /// Integer that represents 0.0.
    pub zero_point: i64,
}

/// How to pin input shapes at load, and how to run.
#[derive(Debug, Clone, Default)]
pub struct LoadOptions {
    /// Shapes by input name; an empty name applies to the first input.
    pub input_shapes: HashMap<String, Vec<usize>>,
    /// Size of a symbolic leading (batch) dimension; 1 when not given.
    pub batch: Option<usize>,
    /// Skip the warm-up inference (for `inspect`).
    pub skip_warmup: bool,
    /// Run QDQ models on the float path (activation Q/DQ pairs folded into Clips).
    pub qdq_as_float: bool,
    /// Threads for tract's matrix products and edgeinfer's convolutions; 0 and 1 both mean one (no thread pool).
    pub threads: usize,
    /// Start-up cache directory for ONNX models (see `cache`); `None`: no cache.
    pub cache_dir: Option<PathBuf>,
}

/// Durations of the load stages.
#[derive(Debug, Clone, Copy, Default, serde::Serialize)]
pub struct LoadTimings {
    /// Reading and hashing the file; decoding and rewriting the protobuf, or
    /// unpacking a converted model or cache entry.
    pub read_ms: f64,
    /// Building tract's typed graph (from ONNX: inferring types and shapes).
    pub analyse_ms: f64,
    /// Decluttering, optimising and planning.
    pub optimize_ms: f64,
    /// Writing a new start-up cache entry (0 unless the cache missed).
    pub cache_write_ms: f64,
    /// The warm-up inference (0 when skipped).
    pub warmup_ms: f64,
}

impl LoadTimings {
    /// Load + optimise, without warm-up.
    pub fn init_ms(&self) -> f64 {
        self.read_ms + self.analyse_ms + self.optimize_ms + self.cache_write_ms
    }
}

/// Where the graph a model runs came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Origin {
    /// Parsed from the ONNX file.
    Onnx,
    /// A start-up cache entry of the ONNX file.
    Cache,
    /// A file made by `edgeinfer convert`.
    Converted,
}

impl std::fmt::Display for Origin {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Origin::Onnx => "onnx",
            Origin::Cache => "cache",
            Origin::Converted => "converted",
        })
    }
}

/// What a model is, beyond its inputs and outputs.
#[derive(Debug, Clone, serde::Serialize)]
pub struct ModelInfo {
    /// The file it was loaded from (ONNX or converted).
    pub path: PathBuf,
    /// File stem (without `.nnef.tgz` for a converted model), used as the model's name in results.
    pub name: String,
    /// SHA-256 of the ONNX file, hex; for a converted model, of the ONNX file it
    /// was converted from, so results name the same model either way.
    pub sha256: String,
    /// Size of that ONNX file.
    pub size_bytes: u64,
    /// The ONNX file (for a converted model: as it was named at conversion).
    pub onnx_path: PathBuf,
    /// Where the graph came from: `onnx`, `cache` or `converted`.
    pub origin: Origin,
    /// What the start-up cache did (`None` without a cache directory or for a converted model).
    pub cache: Option<String>,
    /// Threads for matrix products.
    pub threads: usize,
    /// Producer recorded in the file.
    pub producer: String,
    /// Default-domain opset.
    pub opset: i64,
    /// Other imported domains and versions.
    pub other_opsets: BTreeMap<String, i64>,
    /// Operator counts as in the file.
    pub op_counts: BTreeMap<String, usize>,
    /// "float (not quantized)", "QDQ", "QOperator", "dynamic" or a mix.
    pub quantization: String,
    /// Which kernels run the model: "float"; for QDQ and QOperator models float kernels with
    /// their activation rounding kept or (`qdq_as_float`, QDQ) folded away, and how many
    /// convolutions run on our integer kernel; "integer (as quantized)".
    pub int8_path: String,
    /// Rewrites applied before tract saw the graph.
    pub rewrites: Vec<String>,
    /// True when the file's `value_info` had to be ignored to load it.
    pub value_info_ignored: bool,
    /// Nodes in tract's optimised plan.
    pub optimized_nodes: usize,
    /// Op kinds in the optimised plan, with counts.
    pub optimized_ops: BTreeMap<String, usize>,
    /// Load stage durations.
    pub timings: LoadTimings,
}

/// An output's name and the quantization the ONNX graph gives it.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
struct OutputMeta {
    name: String,
    #[serde(default)]
    quantization: Option<QuantParams>,
}

/// What the ONNX file said and how it was pinned: everything a [`Model`]
/// needs besides tract's graph. A converted model carries it in its sidecar,
/// since NNEF keeps none of it.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
struct ModelMeta {
    onnx_path: PathBuf,
    sha256: String,
    size_bytes: u64,
    producer: String,
    opset: i64,
    other_opsets: BTreeMap<String, i64>,
    op_counts: BTreeMap<String, usize>,
    quantization: String,
    int8_path: String,
    rewrites: Vec<String>,
    value_info_ignored: bool,
    /// Pinned inputs, in graph order.
    inputs: Vec<TensorSpec>,
    /// Outputs, in graph order.
    outputs: Vec<OutputMeta>,
    /// The QDQ float path was applied.
    qdq_as_float: bool,
    /// The size a symbolic leading dimension was given...
    batch: usize,
    /// ...when some input had one (otherwise `batch` decided nothing).
    batch_filled: bool,
}

/// A loaded, optimised model. Cheap to share between threads.
pub struct Model {
    plan: Arc<TypedRunnableModel>,
    inputs: Vec<TensorSpec>,
    outputs: Vec<TensorSpec>,
    info: ModelInfo,
}

impl std::fmt::Debug for Model {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Model").field("name", &self.info.name).finish_non_exhaustive()
    }
}

/// tract's version: in error messages, `inspect`, converted models and the cache key.
/// A unit test keeps it equal to the version in Cargo.lock.
pub const TRACT_VERSION: &str = "0.23.9";

/// The name our 3x3 and 5x5 depthwise convolution has in `ModelInfo::optimized_ops`.
pub const DEPTHWISE_OP: &str = depthwise::OP_NAME;

/// The name our int8 convolution has in `ModelInfo::optimized_ops`.
pub const INT8_CONV_OP: &str = int8_conv::OP_NAME;

/// The name our float 1x1 convolution has in `ModelInfo::optimized_ops`.
pub const POINTWISE_OP: &str = pointwise::OP_NAME;

/// The name of tract's own depthwise convolution there.
pub const TRACT_DEPTHWISE_OP: &str = "DepthWiseConv";

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

/// Renders an error chain on one line.
fn one_line(e: &impl std::fmt::Display) -> String {
    e.to_string().replace('\n', " ")
}

fn tract_err(e: TractError) -> String {
    one_line(&format!("{e:#}"))
}

fn panic_text(p: Box<dyn std::any::Any + Send>) -> String {
    p.downcast_ref::<&str>()
        .map(|s| s.to_string())
        .or_else(|| p.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "unknown panic".into())
}

fn datum_of(t: ElemType) -> DatumType {
    match t {
        ElemType::F32 => DatumType::F32,
        ElemType::F64 => DatumType::F64,
        ElemType::I8 => DatumType::I8,
        ElemType::U8 => DatumType::U8,
        ElemType::I16 => DatumType::I16,
        ElemType::I32 => DatumType::I32,
        ElemType::I64 => DatumType::I64,
        ElemType::Bool => DatumType::Bool,
        ElemType::String => DatumType::String,
    }
}

fn elem_of(dt: DatumType) -> Option<ElemType> {
    Some(match dt.unquantized() {
        DatumType::F32 => ElemType::F32,
        DatumType::F64 => ElemType::F64,
        DatumType::I8 => ElemType::I8,
        DatumType::U8 => ElemType::U8,
        DatumType::I16 => ElemType::I16,
        DatumType::I32 => ElemType::I32,
        DatumType::I64 => ElemType::I64,
        DatumType::Bool => ElemType::Bool,
        DatumType::String => ElemType::String,
        _ => return None,
    })
}

/// What `convert` wrote, and the converted model loaded back from it.
#[derive(Debug)]
pub struct Converted {
    /// The file written.
    pub path: PathBuf,
    /// Its size.
    pub size_bytes: u64,
    /// Decode, analyse, declutter and serialise.
    pub convert_ms: f64,
    /// The converted file, loaded as a daemon would load it (warm-up included).
    pub model: Model,
}

/// The facts of one load that are not the graph: where it came from and how long each part took.
struct Provenance {
    path: PathBuf,
    name: String,
    origin: Origin,
    cache: Option<String>,
    timings: LoadTimings,
}

/// Converts an ONNX model into a `.nnef.tgz` (gzipped) or `.nnef.tar` file that
/// [`Model::load`] reads without the ONNX parser, with the same inputs, outputs
/// and results. The file is written atomically, then loaded back and run once.
pub fn convert(onnx_path: &Path, opts: &LoadOptions, out: &Path) -> Result<Converted, EngineError> {
    let shown = out.display().to_string();
    let bad = |reason: String| EngineError::Converted { path: shown.clone(), reason };
    if is_converted(onnx_path) {
        return Err(bad(format!("{} is already a converted model", onnx_path.display())));
    }
    let name = out.file_name().map(|n| n.to_string_lossy().to_lowercase()).unwrap_or_default();
    let compress = if name.ends_with(".nnef.tgz") {
        true
    } else if name.ends_with(".nnef.tar") {
        false
    } else {
        return Err(bad("the output must end in .nnef.tgz (gzipped) or .nnef.tar".into()));
    };
    let t = Instant::now();
    let size_bytes = guarded(onnx_path, || {
        let bytes = read_file(onnx_path)?;
        let sha256 = hex(&Sha256::digest(&bytes));
        let typed = parse_onnx(onnx_path, &bytes, sha256, opts)?;
        let mut model = typed.model;
        declutter(&mut model)
            .map_err(|e| EngineError::Load { path: onnx_path.display().to_string(), reason: tract_err(e) })?;
        converted::write_file(&model, &typed.meta, out, compress)
            .map_err(|reason| bad(format!("cannot write it: {reason}")))
    })?;
    let convert_ms = ms(t.elapsed());
    let check = LoadOptions { cache_dir: None, ..opts.clone() };
    let model = Model::load(out, &check)
        .map_err(|e| bad(format!("written, but it does not load back ({e}); please report this model")))?;
    Ok(Converted { path: out.to_path_buf(), size_bytes, convert_ms, model })
}

/// Most elements one tensor of a model may have (512 MiB of f32): the largest camera
/// frames and audio windows are far below it. A file whose shapes ask for more is
/// refused at load, before the warm-up allocates them.
pub const MAX_TENSOR_ELEMENTS: usize = 1 << 27;

/// Refuses a plan with a tensor (input, output or in between) over [`MAX_TENSOR_ELEMENTS`].
fn check_tensor_sizes(model: &TypedModel) -> Result<(), String> {
    for node in model.nodes() {
        for (slot, output) in node.outputs.iter().enumerate() {
            let Some(shape) = output.fact.shape.as_concrete() else { continue };
            let elements = shape.iter().try_fold(1usize, |n, &d| n.checked_mul(d));
            if elements.is_none_or(|n| n > MAX_TENSOR_ELEMENTS) {
                let n = elements.map_or(format!("more than {}", usize::MAX), |n| n.to_string());
                return Err(format!(
                    "node `{}` output {slot} has shape {shape:?}: {n} elements, over the {MAX_TENSOR_ELEMENTS} \
                     one tensor may hold",
                    node.name
                ));
            }
        }
    }
    Ok(())
}

/// Runs `f`, turning a panic inside tract into an error: a bad model must never crash us.
fn guarded<T>(path: &Path, f: impl FnOnce() -> Result<T, EngineError>) -> Result<T, EngineError> {
    std::panic::catch_unwind(AssertUnwindSafe(f)).unwrap_or_else(|p| {
        Err(EngineError::Load {
            path: path.display().to_string(),
            reason: format!("internal error in the engine: {}", panic_text(p)),
        })
    })
}

/// An ONNX model as tract's typed graph, before optimisation.
struct Typed {
    model: TypedModel,
    meta: ModelMeta,
    /// Decoding and rewriting the protobuf (the file was read by the caller).
    decode_ms: f64,
    /// Building tract's graph and inferring types and shapes.
    analyse_ms: f64,
}

/// Parses an ONNX model with tract-onnx.
#[cfg(feature = "onnx")]
fn parse_onnx(path: &Path, bytes: &[u8], sha256: String, opts: &LoadOptions) -> Result<Typed, EngineError> {
    onnx::load_typed(path, bytes, sha256, opts)
}

/// Without the `onnx` feature an ONNX model loads only from a start-up cache entry.
#[cfg(not(feature = "onnx"))]
fn parse_onnx(path: &Path, _bytes: &[u8], _sha256: String, opts: &LoadOptions) -> Result<Typed, EngineError> {
    let cache = match &opts.cache_dir {
        Some(_) => "this model has no start-up cache entry yet (a full build writes one); ",
        None => "",
    };
    Err(EngineError::Load {
        path: path.display().to_string(),
        reason: format!(
            "{}; {cache}or convert it on a PC with `edgeinfer convert` and ship the .nnef.tgz",
            crate::features::not_built("onnx", "an ONNX model")
        ),
    })
}

/// tract's executor for `threads` (more than one needs the `threads` feature,
/// which `Model::load` checked).
#[cfg(feature = "threads")]
fn executor(threads: usize) -> Executor {
    if threads > 1 {
        Executor::multithread(threads)
    } else {
        Executor::SingleThread
    }
}

/// Without the `threads` feature there is no thread pool (no rayon).
#[cfg(not(feature = "threads"))]
fn executor(_threads: usize) -> Executor {
    Executor::SingleThread
}

/// Largest ONNX file read: protobuf cannot encode a message over 2 GiB, so a larger
/// file is not a model, and reading it whole could exhaust a board's memory.
pub const MAX_ONNX_BYTES: u64 = 2 << 30;

fn read_file(path: &Path) -> Result<Vec<u8>, EngineError> {
    let io = |reason: String| EngineError::Io { path: path.display().to_string(), reason };
    let file = std::fs::File::open(path).map_err(|e| io(e.to_string()))?;
    let len = file.metadata().map_err(|e| io(e.to_string()))?.len();
    if len > MAX_ONNX_BYTES {
        return Err(io(format!("{len} bytes is over the 2 GiB an ONNX (protobuf) file can hold")));
    }
    // The length is a hint (the file may change); 2 GiB would not fit a 32-bit capacity.
    let mut bytes = Vec::with_capacity(len.min(256 << 20) as usize);
    // `take`: a file that grows while it is read stops at the bound all the same.
    (&file).take(MAX_ONNX_BYTES + 1).read_to_end(&mut bytes).map_err(|e| io(e.to_string()))?;
    if bytes.len() as u64 > MAX_ONNX_BYTES {
        return Err(io("grew over 2 GiB while it was read".into()));
    }
    Ok(bytes)
}

fn open_file(path: &Path) -> Result<std::fs::File, EngineError> {
    std::fs::File::open(path).map_err(|e| EngineError::Io { path: path.display().to_string(), reason: e.to_string() })
}

/// The SHA-256 of a file, read in blocks: a cache hit then never holds the
/// ONNX bytes it does not parse.
fn sha256_of_file(path: &Path) -> Result<String, EngineError> {
    let mut h = Sha256::new();
    std::io::copy(&mut open_file(path)?, &mut h)
        .map_err(|e| EngineError::Io { path: path.display().to_string(), reason: e.to_string() })?;
    Ok(hex(&h.finalize()))
}

impl Model {
    /// Loads, checks, pins, optimises and warms up a model file: ONNX, or a
    /// converted model (`.nnef.tgz` / `.nnef.tar`, from `edgeinfer convert`).
    pub fn load(path: &Path, opts: &LoadOptions) -> Result<Model, EngineError> {
        if opts.threads > 1 {
            crate::features::require("threads", &format!("{} threads", opts.threads))
                .map_err(|reason| EngineError::Load { path: path.display().to_string(), reason })?;
        }
        guarded(
            path,
            || {
                if is_converted(path) {
                    Self::load_converted(path, opts)
                } else {
                    Self::load_onnx(path, opts)
                }
            },
        )
    }

    /// Loads a converted model. Needs no ONNX parser.
    fn load_converted(path: &Path, opts: &LoadOptions) -> Result<Model, EngineError> {
        let shown = path.display().to_string();
        let t = Instant::now();
        let file = open_file(path)?;
        let read_ms = ms(t.elapsed());
        let unpacked =
            converted::read(file).map_err(|reason| EngineError::Converted { path: shown.clone(), reason })?;
        if unpacked.sidecar.tract_version != TRACT_VERSION {
            log::warn!(
                "{shown}: converted with tract {}, running on tract {TRACT_VERSION}; convert it again if results differ",
                unpacked.sidecar.tract_version
            );
        }
        let meta = unpacked.sidecar.meta;
        check_converted_options(&meta, opts, &shown)?;
        let timings =
            LoadTimings { read_ms: read_ms + unpacked.unpack_ms, analyse_ms: unpacked.build_ms, ..Default::default() };
        let prov = Provenance {
            path: path.to_path_buf(),
            name: converted::stem(path),
            origin: Origin::Converted,
            cache: None,
            timings,
        };
        Self::finish(unpacked.model, meta, opts, prov)
    }

    /// Loads an ONNX model, through the start-up cache when there is one.
    fn load_onnx(path: &Path, opts: &LoadOptions) -> Result<Model, EngineError> {
        let shown = path.display().to_string();
        let t = Instant::now();
        let name = path.file_stem().map(|s| s.to_string_lossy().into_owned()).unwrap_or_else(|| "model".into());
        let mut cache_note = None;
        if let Some(dir) = &opts.cache_dir {
            let sha256 = sha256_of_file(path)?;
            let read_ms = ms(t.elapsed());
            let entry = cache::entry_path(dir, &name, &cache::key(&sha256, opts));
            match Self::read_cache_entry(&entry, &sha256) {
                Ok(Some((model, mut meta, unpack_ms, build_ms))) => {
                    meta.onnx_path = path.to_path_buf();
                    let timings =
                        LoadTimings { read_ms: read_ms + unpack_ms, analyse_ms: build_ms, ..Default::default() };
                    let cache = Some(format!("hit {}", entry.display()));
                    let prov = Provenance { path: path.to_path_buf(), name, origin: Origin::Cache, cache, timings };
                    return Self::finish(model, meta, opts, prov);
                }
                Ok(None) => {}
                Err(reason) => {
                    log::warn!("{shown}: ignoring the unusable start-up cache entry {}: {reason}", entry.display());
                    cache_note = Some(format!("unusable entry ignored ({reason})"));
                }
            }
        }
        // A miss hashes the bytes it parses again, so that the entry it writes is
        // keyed by them even if the file was replaced in between.
        let bytes = read_file(path)?;
        let sha256 = hex(&Sha256::digest(&bytes));
        let read_ms = ms(t.elapsed());
        let entry = opts.cache_dir.as_ref().map(|dir| cache::entry_path(dir, &name, &cache::key(&sha256, opts)));
        let typed = parse_onnx(path, &bytes, sha256, opts)?;
        let mut timings =
            LoadTimings { read_ms: read_ms + typed.decode_ms, analyse_ms: typed.analyse_ms, ..Default::default() };
        let mut model = typed.model;
        if let Some(entry) = &entry {
            let t = Instant::now();
            // The entry holds the decluttered graph: what NNEF can express, and less
            // work for the next start. Decluttering here is not lost: optimising does it first.
            declutter(&mut model).map_err(|e| EngineError::Load { path: shown.clone(), reason: tract_err(e) })?;
            let written = entry
                .parent()
                .map_or(Ok(()), std::fs::create_dir_all)
                .map_err(|e| e.to_string())
                .and_then(|_| converted::write_file(&model, &typed.meta, entry, false));
            let note = match written {
                Ok(size) => {
                    log::info!("{shown}: start-up cache entry written: {} ({size} bytes)", entry.display());
                    format!("miss; written {}", entry.display())
                }
                Err(reason) => {
                    log::warn!("{shown}: cannot write the start-up cache entry {}: {reason}", entry.display());
                    format!("miss; not written ({reason})")
                }
            };
            cache_note = Some(match cache_note {
                Some(before) => format!("{before}; {note}"),
                None => note,
            });
            timings.cache_write_ms = ms(t.elapsed());
        }
        let prov = Provenance { path: path.to_path_buf(), name, origin: Origin::Onnx, cache: cache_note, timings };
        Self::finish(model, typed.meta, opts, prov)
    }

    /// A cache entry's graph and meta; `Ok(None)` when there is none, `Err` when it is unusable.
    #[allow(clippy::type_complexity)]
    fn read_cache_entry(entry: &Path, sha256: &str) -> Result<Option<(TypedModel, ModelMeta, f64, f64)>, String> {
        let t = Instant::now();
        let file = match std::fs::File::open(entry) {
            Ok(f) => f,
            // No entry yet; a cache path that is no directory is reported when writing.
            Err(e) if matches!(e.kind(), std::io::ErrorKind::NotFound | std::io::ErrorKind::NotADirectory) => {
                return Ok(None)
            }
            Err(e) => return Err(e.to_string()),
        };
        let read_ms = ms(t.elapsed());
        // tract may assert on a damaged graph: a cache must never take the daemon down.
        let unpacked = std::panic::catch_unwind(AssertUnwindSafe(|| converted::read(file)))
            .map_err(|p| format!("internal error in the engine: {}", panic_text(p)))??;
        if unpacked.sidecar.meta.sha256 != sha256 {
            return Err(format!("it was made from another file (sha256 {})", unpacked.sidecar.meta.sha256));
        }
        Ok(Some((unpacked.model, unpacked.sidecar.meta, read_ms + unpacked.unpack_ms, unpacked.build_ms)))
    }

    /// Optimises and plans a typed graph, fills in the specs and runs the warm-up.
    fn finish(typed: TypedModel, meta: ModelMeta, opts: &LoadOptions, prov: Provenance) -> Result<Model, EngineError> {
        let shown = prov.path.display().to_string();
        let load_err = |e: TractError| EngineError::Load { path: shown.clone(), reason: tract_err(e) };
        let t = Instant::now();
        isa::check_env().map_err(|reason| EngineError::Load { path: shown.clone(), reason })?;
        let mut optimized = typed;
        declutter(&mut optimized).map_err(load_err)?;
        depthwise::use_for_depthwise_convs(&mut optimized).map_err(load_err)?;
        int8_conv::use_for_int8_convs(&mut optimized).map_err(load_err)?;
        pointwise::use_for_pointwise_convs(&mut optimized).map_err(load_err)?;
        optimized.optimize().map_err(load_err)?;
        quant_dequant::fuse_into_matmuls(&mut optimized).map_err(load_err)?;
        let mut optimized_ops = BTreeMap::new();
        for node in optimized.nodes() {
            *optimized_ops.entry(node.op.name().to_string()).or_insert(0usize) += 1;
        }
        let optimized_nodes = optimized.nodes().len();
        let int8_convs = optimized_ops.get(int8_conv::OP_NAME).copied().unwrap_or(0);
        let int8_path = if int8_convs > 0 {
            let noun = if int8_convs == 1 { "convolution" } else { "convolutions" };
            let isa = isa::Isa::current().describe();
            format!("{}; {int8_convs} {noun} on integer kernels ({isa})", meta.int8_path)
        } else {
            meta.int8_path
        };
        let threads = opts.threads.max(1);
        let executor = executor(threads);
        let run_options = RunOptions { executor: Some(executor), ..Default::default() };
        let plan = SimplePlan::new_with_options(optimized, &run_options).map_err(load_err)?;
        let mut timings = prov.timings;
        timings.optimize_ms = ms(t.elapsed());

        let model = plan.model();
        check_tensor_sizes(model).map_err(|reason| EngineError::Load { path: shown.clone(), reason })?;
        let mut inputs = meta.inputs.clone();
        for (ix, spec) in inputs.iter_mut().enumerate() {
            let fact = model.input_fact(ix).map_err(load_err)?;
            if let Some(et) = elem_of(fact.datum_type) {
                spec.elem_type = et;
            }
        }
        let mut outputs = Vec::new();
        for (ix, out) in meta.outputs.iter().enumerate() {
            let name = &out.name;
            let fact = model.output_fact(ix).map_err(load_err)?;
            let shape = fact.shape.as_concrete().map(|s| s.to_vec()).ok_or_else(|| EngineError::Load {
                path: shown.clone(),
                reason: format!("output `{name}` has no fixed shape ({:?}) after pinning the inputs", fact.shape),
            })?;
            let elem_type = elem_of(fact.datum_type).ok_or_else(|| EngineError::Load {
                path: shown.clone(),
                reason: format!("output `{name}` has unsupported type {:?}", fact.datum_type),
            })?;
            let quantization = match fact.datum_type.qparams() {
                Some(q) => {
                    let (zero_point, scale) = q.zp_scale();
                    Some(QuantParams { scale, zero_point: zero_point as i64 })
                }
                None => out.quantization,
            };
            outputs.push(TensorSpec { name: name.clone(), shape, elem_type, quantization });
        }

        let info = ModelInfo {
            path: prov.path,
            name: prov.name,
            sha256: meta.sha256,
            size_bytes: meta.size_bytes,
            onnx_path: meta.onnx_path,
            origin: prov.origin,
            cache: prov.cache,
            threads,
            producer: meta.producer,
            opset: meta.opset,
            other_opsets: meta.other_opsets,
            op_counts: meta.op_counts,
            quantization: meta.quantization,
            int8_path,
            rewrites: meta.rewrites,
            value_info_ignored: meta.value_info_ignored,
            optimized_nodes,
            optimized_ops,
            timings,
        };
        let mut model = Model { plan, inputs, outputs, info };
        if !opts.skip_warmup {
            let t = Instant::now();
            let mut session = model.session()?;
            let zeros: Vec<Tensor> =
                model.inputs.iter().map(|spec| Tensor::zeros(&spec.shape, spec.elem_type)).collect();
            session
                .run(&zeros)
                .map_err(|e| EngineError::Load { path: shown.clone(), reason: format!("warm-up run failed: {e}") })?;
            model.info.timings.warmup_ms = ms(t.elapsed());
        }
        Ok(model)
    }

    /// The inputs, in graph order, with their pinned shapes.
    pub fn inputs(&self) -> &[TensorSpec] {
        &self.inputs
    }

    /// The outputs, in graph order.
    pub fn outputs(&self) -> &[TensorSpec] {
        &self.outputs
    }

    /// Facts about the model and its load.
    pub fn info(&self) -> &ModelInfo {
        &self.info
    }

    /// A fresh execution state for one worker thread.
    pub fn session(&self) -> Result<Session, EngineError> {
        let state = TypedSimpleState::new(&self.plan).map_err(|e| EngineError::Run(tract_err(e)))?;
        let buffers = self
            .inputs
            .iter()
            .map(|s| TTensor::zero_dt(datum_of(s.elem_type), &s.shape).map(Arc::new))
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| EngineError::Run(tract_err(e)))?;
        // Ops with per-session state (Scan bodies from LSTM/GRU) keep it across runs in
        // tract; an ONNX model promises independent runs, so such state is restored
        // before each run. Plans without stateful ops pay nothing.
        let stateful = state.op_states.iter().filter(|s| s.is_some()).count();
        if stateful > 0 {
            log::debug!("{stateful} stateful op(s): their state is reset before each run");
        }
        let pristine = (stateful > 0).then(|| state.op_states.clone());
        Ok(Session { state, buffers, specs: self.inputs.clone(), pristine })
    }
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// A converted model is pinned: options asking for other shapes, another batch
/// or the other QDQ path are errors that say to convert again, never ignored.
fn check_converted_options(meta: &ModelMeta, opts: &LoadOptions, path: &str) -> Result<(), EngineError> {
    let err = |input: &str, reason: String| EngineError::Shape { path: path.into(), input: input.into(), reason };
    for (name, shape) in &opts.input_shapes {
        let spec = if name.is_empty() { meta.inputs.first() } else { meta.inputs.iter().find(|s| &s.name == name) };
        let Some(spec) = spec else {
            let names: Vec<_> = meta.inputs.iter().map(|s| s.name.as_str()).collect();
            return Err(err(name, format!("no such input; the model's inputs are {names:?}")));
        };
        if &spec.shape != shape {
            return Err(err(
                &spec.name,
                format!(
                    "the converted model is pinned to {:?}, {shape:?} was asked for; convert the ONNX model again with --input-shape {}={}",
                    spec.shape,
                    spec.name,
                    shape.iter().map(|d| d.to_string()).collect::<Vec<_>>().join(",")
                ),
            ));
        }
    }
    let batch = opts.batch.unwrap_or(1);
    if meta.batch_filled && opts.input_shapes.is_empty() && batch != meta.batch {
        let first = meta.inputs.first().map(|s| s.name.as_str()).unwrap_or("");
        return Err(err(
            first,
            format!("the converted model was made for batch {}, batch {batch} was asked for; convert it again with --batch {batch}", meta.batch),
        ));
    }
    if meta.quantization == "QDQ" && opts.qdq_as_float != meta.qdq_as_float {
        let (was, now) = if meta.qdq_as_float { ("with", "without") } else { ("without", "with") };
        return Err(EngineError::Load {
            path: path.into(),
            reason: format!(
                "converted {was} --qdq-as-float (qdq_as_float), loaded {now}; convert the ONNX model again with the path you want"
            ),
        });
    }
    Ok(())
}

/// One worker's execution state and reusable input buffers.
pub struct Session {
    state: TypedSimpleState,
    buffers: Vec<Arc<TTensor>>,
    specs: Vec<TensorSpec>,
    pristine: Option<Vec<Option<Box<dyn tract_core::ops::OpState>>>>,
}

macro_rules! fill {
    ($buf:expr, $v:expr, $t:ty) => {{
        $buf.try_as_plain_ram_mut().and_then(|mut view| Ok(view.as_slice_mut::<$t>()?.copy_from_slice($v)))
    }};
}

impl Session {
    /// The inputs this session expects.
    pub fn inputs(&self) -> &[TensorSpec] {
        &self.specs
    }

    /// Runs one inference. Inputs must match the specs' types and shapes exactly.
    pub fn run(&mut self, inputs: &[Tensor]) -> Result<Vec<Tensor>, EngineError> {
        let mut out = Vec::new();
        self.run_into(inputs, &mut out)?;
        Ok(out)
    }

    /// Runs one inference, writing into `outputs` and reusing its vectors when
    /// their types and sizes already fit (no allocation on a steady stream).
    pub fn run_into(&mut self, inputs: &[Tensor], outputs: &mut Vec<Tensor>) -> Result<(), EngineError> {
        if inputs.len() != self.specs.len() {
            return Err(EngineError::Input {
                input: self.specs.iter().map(|s| s.name.as_str()).collect::<Vec<_>>().join(", "),
                reason: format!("the model takes {} input(s), {} given", self.specs.len(), inputs.len()),
            });
        }
        let mut values = tvec![];
        for ((spec, given), buf) in self.specs.iter().zip(inputs).zip(self.buffers.iter_mut()) {
            if given.elem_type() != spec.elem_type {
                return Err(EngineError::Input {
                    input: spec.name.clone(),
                    reason: format!("expects {} elements, got {}", spec.elem_type, given.elem_type()),
                });
            }
            if given.shape != spec.shape {
                return Err(EngineError::Input {
                    input: spec.name.clone(),
                    reason: format!("expects shape {:?}, got {:?}", spec.shape, given.shape),
                });
            }
            // After a run tract drops its references, so the buffer is ours again.
            if Arc::get_mut(buf).is_none() {
                *buf = Arc::new(
                    TTensor::zero_dt(datum_of(spec.elem_type), &spec.shape)
                        .map_err(|e| EngineError::Run(tract_err(e)))?,
                );
            }
            let t = Arc::get_mut(buf).expect("fresh buffer is unique");
            let filled = match &given.data {
                Data::F32(v) => fill!(t, v, f32),
                Data::F64(v) => fill!(t, v, f64),
                Data::I8(v) => fill!(t, v, i8),
                Data::U8(v) => fill!(t, v, u8),
                Data::I16(v) => fill!(t, v, i16),
                Data::I32(v) => fill!(t, v, i32),
                Data::I64(v) => fill!(t, v, i64),
                Data::Bool(v) => fill!(t, v, bool),
                Data::String(v) => t.try_as_plain_ram_mut().and_then(|mut view| {
                    view.as_slice_mut::<String>()?.clone_from_slice(v);
                    Ok(())
                }),
            };
            filled.map_err(|e| EngineError::Run(tract_err(e)))?;
            values.push(buf.clone().into_tvalue());
        }
        if let Some(pristine) = &self.pristine {
            self.state.op_states.clone_from(pristine);
        }
        let results = std::panic::catch_unwind(AssertUnwindSafe(|| self.state.run(values)))
            .map_err(|p| EngineError::Run(format!("internal error in the engine: {}", panic_text(p))))?
            .map_err(|e| EngineError::Run(tract_err(e)))?;
        outputs.truncate(results.len());
        for (ix, value) in results.into_iter().enumerate() {
            let converted = convert_output(&value, outputs.get_mut(ix))?;
            if let Some(t) = converted {
                outputs.push(t);
            }
        }
        Ok(())
    }
}

/// Copies a tract output into `reuse` when given (returns None), else into a new tensor.
fn convert_output(value: &TValue, reuse: Option<&mut Tensor>) -> Result<Option<Tensor>, EngineError> {
    let err = |e: TractError| EngineError::Run(tract_err(e));
    let view = value.try_as_plain_ram().map_err(err)?;
    let dt = value.datum_type();
    let shape = value.shape().to_vec();
    macro_rules! take {
        ($variant:ident, $t:ty) => {{
            let src = view.as_slice::<$t>().map_err(err)?;
            match reuse {
                Some(Tensor { shape: s, data: Data::$variant(dst) }) => {
                    dst.clear();
                    dst.extend_from_slice(src);
                    s.clear();
                    s.extend_from_slice(&shape);
                    None
                }
                Some(other) => {
                    *other = Tensor { shape, data: Data::$variant(src.to_vec()) };
                    None
                }
                None => Some(Tensor { shape, data: Data::$variant(src.to_vec()) }),
            }
        }};
    }
    let bytes_as_i8 = |b: &[u8]| b.iter().map(|&x| x as i8).collect::<Vec<_>>();
    Ok(match dt {
        DatumType::F32 => take!(F32, f32),
        DatumType::F64 => take!(F64, f64),
        DatumType::I8 => take!(I8, i8),
        DatumType::U8 | DatumType::QU8(_) => {
            let t = Tensor { shape, data: Data::U8(view.as_bytes().to_vec()) };
            put(reuse, t)
        }
        DatumType::QI8(_) => put(reuse, Tensor { shape, data: Data::I8(bytes_as_i8(view.as_bytes())) }),
        DatumType::I16 => take!(I16, i16),
        DatumType::I32 => take!(I32, i32),
        DatumType::I64 => take!(I64, i64),
        DatumType::Bool => take!(Bool, bool),
        DatumType::String => {
            let src = view.as_slice::<String>().map_err(err)?;
            put(reuse, Tensor { shape, data: Data::String(src.to_vec()) })
        }
        DatumType::F16 => {
            let t = value.cast_to_dt(DatumType::F32).map_err(err)?;
            let v = t.try_as_plain_ram().and_then(|v| Ok(v.as_slice::<f32>()?.to_vec())).map_err(err)?;
            put(reuse, Tensor { shape, data: Data::F32(v) })
        }
        other => return Err(EngineError::Run(format!("output of type {other:?} is not supported"))),
    })
}

fn put(reuse: Option<&mut Tensor>, t: Tensor) -> Option<Tensor> {
    match reuse {
        Some(slot) => {
            *slot = t;
            None
        }
        None => Some(t),
    }
}

/// Whether `model` is an int8 (QDQ or dynamically quantized) graph that our integer operators run
/// here, on a CPU where tract's declutter would lay depthwise convolutions
/// out channels-last (aarch64: see `layout`). Float models keep tract's move.
fn keeps_channels_first(model: &TypedModel) -> bool {
    let quantized = model
        .nodes()
        .iter()
        .any(|n| quant_dequant::QuantDequant::of(n).is_some() || n.op_is::<dyn_quant::DynQuantDequant>());
    quantized && tract_linalg::routines::depthwise_c_f32().is_some() && int8_conv::cpu_supported()
}

/// tract's declutter, channels-first where [`keeps_channels_first`] says so:
/// without its axis moves first, so that every depthwise convolution is in
/// its decluttered form, then, with each wrapped ([`layout::KeepLayout`]),
/// the whole declutter. Used before our operators go in, and for a graph
/// written to a file (start-up cache entry, converted model), which then
/// reads back channels-first on every CPU.
pub(super) fn declutter(model: &mut TypedModel) -> TractResult<()> {
    if !keeps_channels_first(model) {
        return model.declutter();
    }
    let mut optimizer = tract_core::optim::Optimizer::declutter();
    optimizer.passes.retain(|pass| !format!("{pass:?}").starts_with("ChangeAxes"));
    optimizer.optimize(model)?;
    layout::wrap(model);
    let result = model.declutter();
    layout::unwrap(model);
    result
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_model_whose_tensors_would_take_gigabytes_is_refused_before_its_warm_up() {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz/regressions/onnx/input-120gb");
        let Err(err) = Model::load(&path, &LoadOptions::default()) else { panic!("loaded") };
        let err = err.to_string();
        assert!(err.contains("30000000000 elements") && err.contains("over the 134217728"), "{err}");
        // A constant of that size, which tract would build while it analyses the graph.
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz/regressions/onnx/constant-of-shape-120gb");
        let Err(err) = Model::load(&path, &LoadOptions::default()) else { panic!("loaded") };
        let err = err.to_string();
        assert!(err.contains("(ConstantOfShape)") && err.contains("[30000, 1000000]"), "{err}");
    }

    #[test]
    fn an_onnx_file_over_two_gib_is_refused_unread() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("huge.onnx");
        // Sparse: no disk space, and nothing would be read before the size check.
        std::fs::File::create(&path).unwrap().set_len(MAX_ONNX_BYTES + 1).unwrap();
        let Err(err) = Model::load(&path, &LoadOptions::default()) else { panic!("loaded") };
        let err = err.to_string();
        assert!(err.contains("huge.onnx") && err.contains("over the 2 GiB"), "{err}");
    }

    #[test]
    #[cfg(feature = "onnx")]
    fn threads_above_one_need_the_threads_feature() {
        let model = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("models/vibration_f32.onnx");
        let two = Model::load(&model, &LoadOptions { threads: 2, skip_warmup: true, ..Default::default() });
        if cfg!(feature = "threads") {
            assert_eq!(two.unwrap().info().threads, 2);
        } else {
            let Err(e) = two else { panic!("2 threads loaded without the `threads` feature") };
            let e = e.to_string();
            assert!(e.contains("vibration_f32.onnx") && e.contains("the `threads` feature"), "{e}");
            let one = Model::load(&model, &LoadOptions { threads: 1, skip_warmup: true, ..Default::default() });
            assert_eq!(one.unwrap().info().threads, 1);
        }
    }

    #[test]
    #[cfg(feature = "onnx")]
    fn loading_fuses_quantize_dequantize_pairs_into_the_matmuls() {
        let model = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("models/digits_cnn_int8.onnx");
        let loaded = Model::load(&model, &LoadOptions { skip_warmup: true, ..Default::default() }).unwrap();
        let info = loaded.info();
        // "... (QDQ: N quantize/dequantize pairs as one EdgeinferQuantDequant op each)"
        let pairs: usize = info
            .int8_path
            .split("QDQ: ")
            .nth(1)
            .and_then(|rest| rest.split(' ').next())
            .and_then(|n| n.parse().ok())
            .unwrap_or_else(|| panic!("no pair count in {:?}", info.int8_path));
        let left = info.optimized_ops.get(quant_dequant::ONNX_OP).copied().unwrap_or(0);
        // The pairs after a convolution run in its matmul's epilogue; the rest stay as passes.
        assert!(left < pairs, "{left} of {pairs} pairs left as passes: {:?}", info.optimized_ops);
    }

    /// Each `op` node's info in the plan, joined into one line.
    #[cfg(feature = "onnx")]
    fn infos_of(model: &TypedModel, op: &str) -> Vec<String> {
        let nodes = model.nodes().iter().filter(|n| n.op.name() == op);
        nodes.map(|n| n.op.info().unwrap().join("; ")).collect()
    }

    /// A committed model, loaded without a warm-up.
    #[cfg(feature = "onnx")]
    fn load_committed(file: &str) -> Model {
        let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("models").join(file);
        Model::load(&path, &LoadOptions { skip_warmup: true, ..Default::default() }).unwrap()
    }

    #[test]
    #[cfg(feature = "onnx")]
    fn loading_runs_depthwise_convolutions_on_our_operator() {
        // The committed int8 MobileNetV2 (the float one is generated, not committed).
        let loaded = load_committed("mobilenetv2_int8.onnx");
        let ops = &loaded.info().optimized_ops;
        let count = |name: &str| ops.iter().filter(|(op, _)| op.contains(name)).map(|(_, n)| n).sum::<usize>();
        if depthwise::cpu_supported() {
            // Its 17 depthwise convolutions, each with the quantize/dequantize
            // pair after it folded in: 30 pairs were passes, 13 are left.
            assert_eq!(count(depthwise::OP_NAME), 17, "{ops:?}");
            assert_eq!(count(TRACT_DEPTHWISE_OP), 0, "{ops:?}");
            assert!(count(quant_dequant::ONNX_OP) <= 13, "{ops:?}");
        } else {
            assert_eq!(count(TRACT_DEPTHWISE_OP), 17, "{ops:?}");
        }
        if int8_conv::cpu_supported() {
            // All 35 other convolutions (the 34 pointwise ones: each expand and
            // project, and the last 320 -> 1280; and the stem), and the classifier.
            assert_eq!(count(int8_conv::OP_NAME), 36, "{ops:?}");
            assert!(loaded.info().int8_path.contains("36 convolutions on integer kernels"));
            // The 17 that feed a depthwise convolution (the stem and the 16
            // expansions) hand it 8-bit indices, and each of the 17 depthwise
            // ones hands its 1x1 projection indices.
            let model = loaded.plan.model();
            let narrow = |op: &str| {
                let nodes = model.nodes().iter();
                nodes.filter(|n| n.op.name() == op && n.outputs[0].fact.datum_type == DatumType::U8).count()
            };
            // (armv7: tract's depthwise convolutions read and write f32.)
            let handed = if depthwise::cpu_supported() { 17 } else { 0 };
            assert_eq!((narrow(int8_conv::OP_NAME), narrow(depthwise::OP_NAME)), (handed, handed));
            // On ARM the depthwise ones sum in integers, and say on which loops.
            if cfg!(any(target_arch = "aarch64", target_arch = "arm")) {
                let want = match isa::Isa::current() {
                    isa::Isa::NeonDot => "sdot",
                    _ if cfg!(target_arch = "arm") => "vmlal",
                    _ => "smlal",
                };
                let infos = infos_of(model, depthwise::OP_NAME);
                assert!(infos.iter().all(|i| i.contains("sums: integer") && i.contains(want)), "{infos:?}");
            }
        } else {
            assert_eq!(count(int8_conv::OP_NAME), 0, "{ops:?}");
        }
        // The float 1x1 operator takes the 34 pointwise ones the integer kernel does not.
        let pointwise = if !int8_conv::cpu_supported() && pointwise::cpu_supported() { 34 } else { 0 };
        assert_eq!(count(pointwise::OP_NAME), pointwise, "{ops:?}");
    }

    #[test]
    #[cfg(feature = "onnx")]
    fn five_by_five_depthwise_convolutions_run_on_our_operator() {
        let infos = infos_of(load_committed("dw5x5_cnn_int8.onnx").plan.model(), depthwise::OP_NAME);
        let fives = infos.iter().filter(|i| i.starts_with("5x5 ")).count();
        // Seven depthwise convolutions, five of them 5x5 (two of stride 2).
        let want = if depthwise::cpu_supported() { (7, 5) } else { (0, 0) };
        assert_eq!((infos.len(), fives), want, "{infos:?}");
        // On ARM the 5x5 ones sum in integers, on `smlal` whatever the 64-bit
        // core (the first 3x3 one reads f32: the stem's output also feeds a
        // residual Add).
        if cfg!(any(target_arch = "aarch64", target_arch = "arm")) && want.0 > 0 {
            let loops = if cfg!(target_arch = "arm") { "vmlal" } else { "smlal" };
            let five = infos.iter().filter(|i| i.starts_with("5x5 "));
            assert!(five.clone().all(|i| i.contains("sums: integer") && i.contains(loops)), "{infos:?}");
        }
    }

    #[test]
    #[cfg(feature = "onnx")]
    fn qdq_matmuls_of_several_rows_run_on_the_integer_kernels() {
        let mut infos = infos_of(load_committed("frames_mlp_int8.onnx").plan.model(), int8_conv::OP_NAME);
        infos.retain(|i| !i.contains(" 1 pixels"));
        // Its three MatMuls of 49 frames: 40 -> 128, 128 -> 128, 128 -> 64
        // (and the classifier, a matrix-vector product, left out here).
        let want = if int8_conv::cpu_supported() { 3 } else { 0 };
        assert_eq!(infos.len(), want, "{infos:?}");
        for (info, (k, o)) in infos.iter().zip([(40, 128), (128, 128), (128, 64)]) {
            assert!(info.contains(&format!("{k} -> {o} channels, 49 pixels")), "{infos:?}");
        }
    }

    #[test]
    #[cfg(feature = "onnx")]
    fn float_pointwise_convolutions_run_on_our_operator_from_onnx_and_from_the_cache() {
        // The detector is fetched from its wheel (models/fetch_detector.py), not committed.
        let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("models/detector_yolov8n.onnx");
        if !path.exists() {
            eprintln!("models/detector_yolov8n.onnx absent; skipped");
            return;
        }
        let dir = tempfile::tempdir().unwrap();
        let opts = LoadOptions {
            skip_warmup: true,
            cache_dir: Some(dir.path().to_path_buf()),
            input_shapes: HashMap::from([("images".to_string(), vec![1, 3, 160, 160])]),
            ..Default::default()
        };
        let first = Model::load(&path, &opts).unwrap();
        let again = Model::load(&path, &opts).unwrap();
        assert_eq!(again.info().origin, Origin::Cache);
        let count = |m: &Model| m.info().optimized_ops.get(pointwise::OP_NAME).copied().unwrap_or(0);
        // Its 54 1x1 convolutions, on both kernels: 20x20 and 10x10 outputs as well as larger ones.
        assert_eq!(count(&first), if pointwise::cpu_supported() { 54 } else { 0 }, "{:?}", first.info().optimized_ops);
        assert_eq!(count(&again), count(&first));
    }

    #[test]
    #[cfg(feature = "onnx")]
    fn cached_int8_models_run_convolutions_on_integer_kernels_too() {
        // The cache's graph comes back from NNEF with other einsum axis letters.
        let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("models/mobilenetv2_int8.onnx");
        let dir = tempfile::tempdir().unwrap();
        let opts = LoadOptions { skip_warmup: true, cache_dir: Some(dir.path().to_path_buf()), ..Default::default() };
        let first = Model::load(&path, &opts).unwrap();
        let again = Model::load(&path, &opts).unwrap();
        assert_eq!(again.info().origin, Origin::Cache);
        let count = |m: &Model| m.info().optimized_ops.get(int8_conv::OP_NAME).copied().unwrap_or(0);
        assert_eq!(count(&again), count(&first));
        assert_eq!(count(&first), if int8_conv::cpu_supported() { 36 } else { 0 });
    }

    #[test]
    fn tract_version_matches_the_lock_file() {
        // The version is part of the cache key and of converted models: it must be the one we build with.
        let lock = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/Cargo.lock")).unwrap();
        let locked = lock
            .split("[[package]]")
            .find(|p| p.contains("name = \"tract-core\""))
            .and_then(|p| p.lines().find_map(|l| l.strip_prefix("version = ")))
            .map(|v| v.trim_matches('"').to_string());
        assert_eq!(locked.as_deref(), Some(TRACT_VERSION));
    }

    /// A meta for a model with one f32 input `x` of shape [1, 3] and no outputs.
    pub(in crate::engine) fn meta_for_tests() -> ModelMeta {
        ModelMeta {
            onnx_path: "m.onnx".into(),
            sha256: "00".into(),
            size_bytes: 1,
            producer: String::new(),
            opset: 13,
            other_opsets: BTreeMap::new(),
            op_counts: BTreeMap::new(),
            quantization: "QDQ".into(),
            int8_path: "integer (as quantized)".into(),
            rewrites: vec![],
            value_info_ignored: false,
            inputs: vec![TensorSpec {
                name: "x".into(),
                shape: vec![1, 3],
                elem_type: ElemType::F32,
                quantization: None,
            }],
            outputs: vec![],
            qdq_as_float: false,
            batch: 1,
            batch_filled: true,
        }
    }

    #[test]
    fn converted_options_must_match_the_pinned_model() {
        let meta = meta_for_tests();
        let ok = |o: &LoadOptions| check_converted_options(&meta, o, "m.nnef.tgz");
        assert!(ok(&LoadOptions::default()).is_ok());
        assert!(ok(&LoadOptions { batch: Some(1), threads: 4, ..Default::default() }).is_ok());
        let mut same = LoadOptions::default();
        same.input_shapes.insert("x".into(), vec![1, 3]);
        assert!(ok(&same).is_ok());
        let mut other = LoadOptions::default();
        other.input_shapes.insert(String::new(), vec![2, 3]);
        let e = ok(&other).unwrap_err().to_string();
        assert!(e.contains("`x`") && e.contains("[1, 3]") && e.contains("--input-shape x=2,3"), "{e}");
        let mut unknown = LoadOptions::default();
        unknown.input_shapes.insert("y".into(), vec![1]);
        assert!(ok(&unknown).unwrap_err().to_string().contains("no such input"));
        let e = ok(&LoadOptions { batch: Some(4), ..Default::default() }).unwrap_err().to_string();
        assert!(e.contains("batch 1") && e.contains("--batch 4"), "{e}");
        let e = ok(&LoadOptions { qdq_as_float: true, ..Default::default() }).unwrap_err().to_string();
        assert!(e.contains("without --qdq-as-float"), "{e}");
    }
}
