//! The inference engine: the only module that imports tract.
//!
//! Loading is: read the file once (hashing it), decode the protobuf, expand
//! QOperator nodes tract lacks (`rewrite`), check every operator is known,
//! pin every input to a concrete shape, then analyse, optimise and plan once.
//! A [`Model`] is shareable across threads; each worker makes its own
//! [`Session`], which keeps tract's execution state and the input buffers
//! between runs.

mod proto;
mod rewrite;

use std::collections::{BTreeMap, HashMap};
use std::panic::AssertUnwindSafe;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use sha2::{Digest, Sha256};
use thiserror::Error;
use tract_onnx::pb;
use tract_onnx::prelude::{
    tvec, DatumType, Framework, InferenceFact, InferenceModelExt, IntoTValue, TValue, Tensor as TTensor,
    TypedRunnableModel, TypedSimpleState,
};

use crate::tensor::{Data, ElemType, Tensor};

pub use proto::DeclaredDim;

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
    /// tract refused the model during analysis or optimisation.
    #[error("{path}: cannot load model: {reason}")]
    Load {
        /// The model file.
        path: String,
        /// tract's error chain on one line.
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
#[derive(Debug, Clone, serde::Serialize)]
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
    #[serde(skip_serializing_if = "Option::is_none")]
    pub quantization: Option<QuantParams>,
}

/// A per-tensor affine quantization: `real = scale * (q - zero_point)`.
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize)]
pub struct QuantParams {
    /// Step size.
    pub scale: f32,
    /// Integer that represents 0.0.
    pub zero_point: i64,
}

/// How to pin input shapes at load.
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
}

/// Durations of the load stages.
#[derive(Debug, Clone, Copy, Default, serde::Serialize)]
pub struct LoadTimings {
    /// Reading and hashing the file, decoding and rewriting the protobuf.
    pub read_ms: f64,
    /// Building tract's graph and inferring types and shapes.
    pub analyse_ms: f64,
    /// Decluttering, optimising and planning.
    pub optimize_ms: f64,
    /// The warm-up inference (0 when skipped).
    pub warmup_ms: f64,
}

impl LoadTimings {
    /// Load + optimise, without warm-up.
    pub fn init_ms(&self) -> f64 {
        self.read_ms + self.analyse_ms + self.optimize_ms
    }
}

/// What a model is, beyond its inputs and outputs.
#[derive(Debug, Clone, serde::Serialize)]
pub struct ModelInfo {
    /// The file it came from.
    pub path: PathBuf,
    /// File stem, used as the model's name in results.
    pub name: String,
    /// SHA-256 of the file, hex.
    pub sha256: String,
    /// File size.
    pub size_bytes: u64,
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
    /// Which kernels run the model: "float", "integer (as quantized)" or the QDQ float path.
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

/// tract's version, for error messages and `inspect`.
pub const TRACT_VERSION: &str = "0.23";

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

/// Renders an error chain on one line.
fn one_line(e: &impl std::fmt::Display) -> String {
    e.to_string().replace('\n', " ")
}

fn tract_err(e: tract_onnx::prelude::TractError) -> String {
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

impl Model {
    /// Loads, checks, pins, optimises and warms up a model file.
    pub fn load(path: &Path, opts: &LoadOptions) -> Result<Model, EngineError> {
        let shown = path.display().to_string();
        // tract may assert on malformed graphs; a bad model must be an error, never a crash.
        std::panic::catch_unwind(AssertUnwindSafe(|| Self::load_inner(path, opts))).unwrap_or_else(|p| {
            Err(EngineError::Load { path: shown, reason: format!("internal error in the engine: {}", panic_text(p)) })
        })
    }

    fn load_inner(path: &Path, opts: &LoadOptions) -> Result<Model, EngineError> {
        let shown = path.display().to_string();
        let t0 = Instant::now();
        let bytes = std::fs::read(path).map_err(|e| EngineError::Io { path: shown.clone(), reason: e.to_string() })?;
        let sha256 = hex(&Sha256::digest(&bytes));
        let onnx = tract_onnx::onnx();
        let mut model_proto = onnx
            .proto_model_for_read(&mut bytes.as_slice())
            .map_err(|e| EngineError::Decode { path: shown.clone(), reason: tract_err(e) })?;
        let graph = model_proto
            .graph
            .as_mut()
            .ok_or_else(|| EngineError::Decode { path: shown.clone(), reason: "the file holds no graph".into() })?;
        if graph.node.is_empty() && graph.output.is_empty() {
            return Err(EngineError::Decode { path: shown, reason: "the graph is empty".into() });
        }
        let op_counts = proto::op_counts(graph);
        let quantization = proto::quantization_style(&op_counts);
        let mut report =
            rewrite::expand_qoperators(graph).map_err(|reason| EngineError::Load { path: shown.clone(), reason })?;
        report.tree_labels_fixed = rewrite::fix_binary_tree_labels(graph);
        // Read before the float path folds the Q/DQ nodes they come from.
        let in_q: HashMap<String, (f32, i64)> = proto::declared_inputs(graph)
            .iter()
            .filter_map(|d| proto::input_qparams(graph, &d.name).map(|q| (d.name.clone(), q)))
            .collect();
        let out_q: HashMap<String, (f32, i64)> = graph
            .output
            .iter()
            .filter_map(|o| proto::output_qparams(graph, &o.name).map(|q| (o.name.clone(), q)))
            .collect();
        let int8_path = if quantization == "QDQ" && opts.qdq_as_float {
            let folded = rewrite::fold_qdq_activations(graph);
            format!("float (QDQ: {folded} activation quantize/dequantize pairs folded into Clip)")
        } else if quantization == "float (not quantized)" {
            "float".to_string()
        } else {
            "integer (as quantized)".to_string()
        };
        check_ops(&onnx, graph, &shown)?;
        let pinned = pin_inputs(graph, opts, &shown)?;
        let graph = model_proto.graph.as_ref().expect("checked above");
        let mut inputs: Vec<TensorSpec> = pinned
            .iter()
            .map(|(name, elem_type, shape)| TensorSpec {
                name: name.clone(),
                shape: shape.clone(),
                elem_type: *elem_type,
                quantization: in_q.get(name).copied().map(|(scale, zero_point)| QuantParams { scale, zero_point }),
            })
            .collect();
        let output_names: Vec<String> = graph.output.iter().map(|o| o.name.clone()).collect();
        let read_ms = ms(t0.elapsed());

        let dir = path.parent().and_then(|p| p.to_str()).map(|s| s.to_string());
        let build = |ignore_value_info: bool| -> Result<(tract_onnx::prelude::TypedModel, f64), String> {
            let t = Instant::now();
            let framework = tract_onnx::onnx().with_ignore_value_info(ignore_value_info);
            let parsed = framework.parse(&model_proto, dir.as_deref()).map_err(tract_err)?;
            if !parsed.unresolved_inputs.is_empty() {
                return Err(format!("graph refers to undefined tensors {:?}", parsed.unresolved_inputs));
            }
            let mut model = parsed.model;
            for (ix, (_, elem_type, shape)) in pinned.iter().enumerate() {
                model.set_input_fact(ix, InferenceFact::dt_shape(datum_of(*elem_type), shape)).map_err(tract_err)?;
            }
            let typed = model.into_typed().map_err(tract_err)?;
            Ok((typed, ms(t.elapsed())))
        };
        let (typed, analyse_ms, value_info_ignored) = match build(false) {
            Ok((m, t)) => (m, t, false),
            Err(first) => match build(true) {
                Ok((m, t)) => {
                    log::warn!("{shown}: ignoring the model's value_info, which conflicts with its graph ({first})");
                    (m, t, true)
                }
                Err(_) => return Err(EngineError::Load { path: shown, reason: first }),
            },
        };
        let t = Instant::now();
        let optimized =
            typed.into_optimized().map_err(|e| EngineError::Load { path: shown.clone(), reason: tract_err(e) })?;
        let mut optimized_ops = BTreeMap::new();
        for node in optimized.nodes() {
            *optimized_ops.entry(node.op.name().to_string()).or_insert(0usize) += 1;
        }
        let optimized_nodes = optimized.nodes().len();
        let plan = tract_onnx::tract_core::plan::SimplePlan::new(optimized)
            .map_err(|e| EngineError::Load { path: shown.clone(), reason: tract_err(e) })?;
        let optimize_ms = ms(t.elapsed());

        let model = plan.model();
        for (ix, spec) in inputs.iter_mut().enumerate() {
            let fact =
                model.input_fact(ix).map_err(|e| EngineError::Load { path: shown.clone(), reason: tract_err(e) })?;
            if let Some(et) = elem_of(fact.datum_type) {
                spec.elem_type = et;
            }
        }
        let mut outputs = Vec::new();
        for (ix, name) in output_names.iter().enumerate() {
            let fact =
                model.output_fact(ix).map_err(|e| EngineError::Load { path: shown.clone(), reason: tract_err(e) })?;
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
                None => out_q.get(name).map(|&(scale, zero_point)| QuantParams { scale, zero_point }),
            };
            outputs.push(TensorSpec { name: name.clone(), shape, elem_type, quantization });
        }

        let mut other_opsets = BTreeMap::new();
        for o in &model_proto.opset_import {
            if !(o.domain.is_empty() || o.domain == "ai.onnx") {
                other_opsets.insert(o.domain.clone(), o.version);
            }
        }
        let name = path.file_stem().map(|s| s.to_string_lossy().into_owned()).unwrap_or_else(|| "model".into());
        let info = ModelInfo {
            path: path.to_path_buf(),
            name,
            sha256,
            size_bytes: bytes.len() as u64,
            producer: format!("{} {}", model_proto.producer_name, model_proto.producer_version).trim().to_string(),
            opset: proto::opset(&model_proto),
            other_opsets,
            op_counts,
            quantization,
            int8_path,
            rewrites: report.lines(),
            value_info_ignored,
            optimized_nodes,
            optimized_ops,
            timings: LoadTimings { read_ms, analyse_ms, optimize_ms, warmup_ms: 0.0 },
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

/// Rejects operators tract has no implementation for, naming the first one.
fn check_ops(onnx: &tract_onnx::Onnx, graph: &pb::GraphProto, path: &str) -> Result<(), EngineError> {
    for node in proto::all_nodes(graph) {
        let known_domain = matches!(node.domain.as_str(), "" | "ai.onnx" | "ai.onnx.ml" | "com.microsoft");
        if !known_domain || !onnx.op_register.0.contains_key(&node.op_type) {
            let domain = if node.domain.is_empty() { String::new() } else { format!(" (domain {})", node.domain) };
            let node_name =
                if node.name.is_empty() { node.output.first().cloned().unwrap_or_default() } else { node.name.clone() };
            return Err(EngineError::UnsupportedOp {
                path: path.to_string(),
                op: node.op_type.clone(),
                domain,
                node: node_name,
                tract: TRACT_VERSION,
            });
        }
    }
    Ok(())
}

/// Decides the concrete shape of every input: fixed dims from the model,
/// the rest from the caller, a symbolic leading dim defaulting to the batch.
fn pin_inputs(
    graph: &pb::GraphProto,
    opts: &LoadOptions,
    path: &str,
) -> Result<Vec<(String, ElemType, Vec<usize>)>, EngineError> {
    let declared = proto::declared_inputs(graph);
    for key in opts.input_shapes.keys() {
        if !key.is_empty() && !declared.iter().any(|d| &d.name == key) {
            let names: Vec<_> = declared.iter().map(|d| d.name.as_str()).collect();
            return Err(EngineError::Shape {
                path: path.into(),
                input: key.clone(),
                reason: format!("no such input; the model's inputs are {names:?}"),
            });
        }
    }
    let mut pinned = Vec::new();
    for (ix, input) in declared.iter().enumerate() {
        let err = |reason: String| EngineError::Shape { path: path.into(), input: input.name.clone(), reason };
        let elem_type = proto::elem_type_of(input.elem_type)
            .ok_or_else(|| err(format!("element type {} is not supported", proto::elem_type_name(input.elem_type))))?;
        let given =
            opts.input_shapes.get(&input.name).or_else(|| if ix == 0 { opts.input_shapes.get("") } else { None });
        let shape = match (&input.dims, given) {
            (None, Some(g)) => g.clone(),
            (None, None) => return Err(err("the model declares no shape; give one with --input-shape NAME=D0,D1,...".into())),
            (Some(dims), Some(g)) => {
                if dims.len() != g.len() {
                    return Err(err(format!("the model declares {} dimensions, the given shape {g:?} has {}", dims.len(), g.len())));
                }
                for (d, (decl, &want)) in dims.iter().zip(g).enumerate() {
                    if let DeclaredDim::Fixed(f) = decl {
                        if *f != want {
                            return Err(err(format!("dimension {d} is fixed at {f} in the model, the given shape {g:?} says {want}")));
                        }
                    }
                }
                g.clone()
            }
            (Some(dims), None) => dims
                .iter()
                .enumerate()
                .map(|(d, decl)| match decl {
                    DeclaredDim::Fixed(f) => Ok(*f),
                    DeclaredDim::Symbolic(_) if d == 0 => Ok(opts.batch.unwrap_or(1)),
                    DeclaredDim::Symbolic(sym) => Err(err(format!(
                        "dimension {d} is symbolic (`{sym}`); give the full shape with --input-shape {}=D0,D1,... (or `input_shape` in the config)",
                        input.name
                    ))),
                })
                .collect::<Result<Vec<_>, _>>()?,
        };
        if shape.contains(&0) {
            return Err(err(format!("shape {shape:?} has a zero dimension")));
        }
        pinned.push((input.name.clone(), elem_type, shape));
    }
    Ok(pinned)
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
    let err = |e: tract_onnx::prelude::TractError| EngineError::Run(tract_err(e));
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
