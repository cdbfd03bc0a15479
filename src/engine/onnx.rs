//! The ONNX front end: decode the protobuf, rewrite what tract lacks, check
//! every operator, pin the inputs and build tract's typed graph. This is the
//! only engine file that needs the ONNX parser (`tract-onnx`); what it
//! produces, a [`TypedModel`] and its [`ModelMeta`], is all the rest of the
//! engine (optimising, running, NNEF conversion and loading) works from.

use std::collections::{BTreeMap, HashMap};
use std::path::Path;
use std::time::Instant;

use tract_core::prelude::{TDim, TractError, TractResult, TypedModel};
use tract_onnx::pb;
use tract_onnx::prelude::{Framework, InferenceFact, InferenceModel, InferenceModelExt};

use super::proto;
use super::rewrite;
use super::symbolic::{self, DeclaredTensor, Description, ShapeDim, UNNAMED};
use super::{
    datum_of, elem_of, ms, tract_err, EngineError, LoadOptions, ModelMeta, OutputMeta, QuantParams, TensorSpec, Typed,
};
use crate::tensor::ElemType;

/// tract-onnx with the operators our QDQ and dynamic quantization rewrites
/// emit (`quant_dequant`, `dyn_quant`).
pub(super) fn framework() -> tract_onnx::Onnx {
    let mut onnx = tract_onnx::onnx();
    super::quant_dequant::register_onnx(&mut onnx);
    super::dyn_quant::register_onnx(&mut onnx);
    onnx
}

/// The protobuf decoded, rewritten where tract lacks an operator and checked,
/// with what was read off it on the way: the first half of a load, shared
/// with [`describe`].
struct Decoded {
    proto: pb::ModelProto,
    op_counts: BTreeMap<String, usize>,
    quantization: String,
    int8_path: String,
    rewrites: Vec<String>,
    /// Quantization next to the inputs and outputs, by tensor name.
    in_q: HashMap<String, QuantParams>,
    out_q: HashMap<String, QuantParams>,
    qdq_as_float: bool,
}

impl Decoded {
    fn graph(&self) -> &pb::GraphProto {
        self.proto.graph.as_ref().expect("decode checked there is a graph")
    }
}

/// Decodes, rewrites and checks the protobuf in `bytes`.
fn decode(path: &Path, bytes: &[u8], opts: &LoadOptions) -> Result<Decoded, EngineError> {
    let shown = path.display().to_string();
    let onnx = framework();
    let mut model_proto = onnx
        .proto_model_for_read(&mut &bytes[..])
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
    let qparams = |(scale, zero_point)| QuantParams { scale, zero_point };
    // Read before the float path folds the Q/DQ nodes they come from.
    let in_q: HashMap<String, QuantParams> = proto::declared_inputs(graph)
        .iter()
        .filter_map(|d| proto::input_qparams(graph, &d.name).map(|q| (d.name.clone(), qparams(q))))
        .collect();
    let out_q: HashMap<String, QuantParams> = graph
        .output
        .iter()
        .filter_map(|o| proto::output_qparams(graph, &o.name).map(|q| (o.name.clone(), qparams(q))))
        .collect();
    let qdq_as_float = quantization == "QDQ" && opts.qdq_as_float;
    let int8_path = if qdq_as_float {
        let folded = rewrite::fold_qdq_activations(graph);
        format!("float (QDQ: {folded} activation quantize/dequantize pairs folded into Clip)")
    } else if quantization == "float (not quantized)" {
        "float".to_string()
    } else {
        // QLinearConvs were expanded to the QDQ form above.
        let dynamic = rewrite::lower_dynamic_quantization(graph);
        let rounded = rewrite::round_qdq_activations(graph);
        let nodes = proto::all_nodes(graph);
        let left: Vec<&str> = ["QLinearConv", "QLinearMatMul", "MatMulInteger", "ConvInteger"]
            .into_iter()
            .filter(|op| nodes.iter().any(|n| n.op_type == *op))
            .collect();
        let integer = if left.is_empty() { String::new() } else { format!("; {} on integer kernels", left.join(", ")) };
        let mut how = Vec::new();
        if rounded > 0 {
            how.push(format!("{rounded} quantize/dequantize pairs as one EdgeinferQuantDequant op each"));
        }
        if dynamic > 0 {
            how.push(format!(
                "{dynamic} ConvInteger/MatMulInteger as float products of activations rounded per inference by \
                 EdgeinferDynamicQuantDequant"
            ));
        }
        if how.is_empty() {
            "integer (as quantized)".to_string()
        } else {
            format!("float kernels, activations rounded as quantized ({quantization}: {}){integer}", how.join("; "))
        }
    };
    rewrite::fold_constant_dequantize(graph);
    check_ops(&onnx, graph, &shown)?;
    Ok(Decoded {
        proto: model_proto,
        op_counts,
        quantization,
        int8_path,
        rewrites: report.lines(),
        in_q,
        out_q,
        qdq_as_float,
    })
}

/// tract's typed graph of a decoded model, with the input facts `set_inputs`
/// gives. A `value_info` that contradicts the graph (as some exporters write)
/// is dropped on a second try: the graph, its analysis time and, when it was
/// dropped, why; or the first try's error.
fn build(
    path: &Path,
    model_proto: &pb::ModelProto,
    set_inputs: &dyn Fn(&mut InferenceModel) -> TractResult<()>,
) -> Result<(TypedModel, f64, Option<String>), String> {
    let dir = path.parent().and_then(|p| p.to_str()).map(|s| s.to_string());
    let attempt = |ignore_value_info: bool| -> Result<(TypedModel, f64), String> {
        let t = Instant::now();
        let tract = framework().with_ignore_value_info(ignore_value_info);
        let parsed = tract.parse(model_proto, dir.as_deref()).map_err(tract_err)?;
        if !parsed.unresolved_inputs.is_empty() {
            return Err(format!("graph refers to undefined tensors {:?}", parsed.unresolved_inputs));
        }
        let mut model = parsed.model;
        set_inputs(&mut model).map_err(tract_err)?;
        let typed = model.into_typed().map_err(tract_err)?;
        Ok((typed, ms(t.elapsed())))
    };
    match attempt(false) {
        Ok((m, t)) => Ok((m, t, None)),
        Err(first) => match attempt(true) {
            Ok((m, t)) => Ok((m, t, Some(first))),
            Err(_) => Err(first),
        },
    }
}

/// Builds tract's typed graph from an ONNX file already read into `bytes`.
/// Refuses `ConstantOfShape` and `Expand` nodes whose shape is an initializer asking
/// for more than [`super::MAX_TENSOR_ELEMENTS`] elements.
fn constant_shapes_fit(graph: &pb::GraphProto) -> Result<(), String> {
    for node in proto::all_nodes(graph) {
        let shape_input = match node.op_type.as_str() {
            "ConstantOfShape" => node.input.first(),
            "Expand" => node.input.get(1),
            _ => None,
        };
        let Some(dims) = shape_input.and_then(|name| proto::initializer_ints(graph, name)) else { continue };
        let elements = dims.iter().try_fold(1usize, |n, &d| n.checked_mul(usize::try_from(d.max(1)).ok()?));
        if elements.is_none_or(|n| n > super::MAX_TENSOR_ELEMENTS) {
            return Err(format!(
                "node `{}` ({}) makes a tensor of shape {dims:?}, over the {} elements one tensor may hold",
                node.name,
                node.op_type,
                super::MAX_TENSOR_ELEMENTS
            ));
        }
    }
    Ok(())
}

pub(super) fn load_typed(path: &Path, bytes: &[u8], sha256: String, opts: &LoadOptions) -> Result<Typed, EngineError> {
    let shown = path.display().to_string();
    let t0 = Instant::now();
    let decoded = decode(path, bytes, opts)?;
    let graph = decoded.graph();
    let (pinned, batch_filled) = pin_inputs(graph, opts, &shown)?;
    // tract evaluates constant subgraphs while it analyses the model: a constant shape
    // that asks for gigabytes would be allocated there, before the plan can be checked.
    constant_shapes_fit(graph).map_err(|reason| EngineError::Load { path: shown.clone(), reason })?;
    let inputs: Vec<TensorSpec> = pinned
        .iter()
        .map(|(name, elem_type, shape)| TensorSpec {
            name: name.clone(),
            shape: shape.clone(),
            elem_type: *elem_type,
            quantization: decoded.in_q.get(name).copied(),
        })
        .collect();
    let outputs: Vec<OutputMeta> = graph
        .output
        .iter()
        .map(|o| OutputMeta { name: o.name.clone(), quantization: decoded.out_q.get(&o.name).copied() })
        .collect();
    let decode_ms = ms(t0.elapsed());

    let set_inputs = |model: &mut InferenceModel| -> TractResult<()> {
        for (ix, (_, elem_type, shape)) in pinned.iter().enumerate() {
            model.set_input_fact(ix, InferenceFact::dt_shape(datum_of(*elem_type), shape))?;
        }
        Ok(())
    };
    let (mut model, analyse_ms, value_info_conflict) =
        build(path, &decoded.proto, &set_inputs).map_err(|reason| EngineError::Load { path: shown.clone(), reason })?;
    if let Some(conflict) = &value_info_conflict {
        log::warn!("{shown}: ignoring the model's value_info, which conflicts with its graph ({conflict})");
    }

    // The file's free-form metadata (author, class names as a Python dict...) is
    // not used past this point, and tract's NNEF reader rejects a string with a
    // single quote in it, which made such a model's cache entry unreadable.
    model.properties.retain(|k, _| !k.starts_with("onnx.metadata_props."));

    let meta = ModelMeta {
        onnx_path: path.to_path_buf(),
        sha256,
        size_bytes: bytes.len() as u64,
        producer: producer(&decoded.proto),
        opset: proto::opset(&decoded.proto),
        other_opsets: other_opsets(&decoded.proto),
        op_counts: decoded.op_counts,
        quantization: decoded.quantization,
        int8_path: decoded.int8_path,
        rewrites: decoded.rewrites,
        value_info_ignored: value_info_conflict.is_some(),
        inputs,
        outputs,
        qdq_as_float: decoded.qdq_as_float,
        batch: opts.batch.unwrap_or(1),
        batch_filled,
    };
    Ok(Typed { model, meta, decode_ms, analyse_ms })
}

fn producer(model_proto: &pb::ModelProto) -> String {
    format!("{} {}", model_proto.producer_name, model_proto.producer_version).trim().to_string()
}

/// Imported domains other than the default one, with their versions.
fn other_opsets(model_proto: &pb::ModelProto) -> BTreeMap<String, i64> {
    let others = model_proto.opset_import.iter().filter(|o| !(o.domain.is_empty() || o.domain == "ai.onnx"));
    others.map(|o| (o.domain.clone(), o.version)).collect()
}

/// The prefix of the tract symbols that stand for dimensions the model gives
/// no name: an output size that depends on one is shown as unnamed too.
const UNNAMED_SYMBOL: &str = "edgeinfer_unnamed_";

/// What an ONNX model declares, read without pinning its inputs: the
/// inputs as declared, and the outputs as tract works them out with the
/// inputs symbolic (or, where that analysis fails, as the file declares them).
pub(super) fn describe(
    path: &Path,
    bytes: &[u8],
    sha256: String,
    name: String,
    opts: &LoadOptions,
) -> Result<Description, EngineError> {
    let decoded = decode(path, bytes, opts)?;
    let graph = decoded.graph();
    let declared_inputs = proto::declared_inputs(graph);
    let inputs: Vec<DeclaredTensor> = declared_inputs
        .iter()
        .map(|d| DeclaredTensor {
            name: d.name.clone(),
            shape: d.dims.clone(),
            elem_type: proto::elem_type_label(d.elem_type),
            quantization: decoded.in_q.get(&d.name).copied(),
        })
        .collect();
    let set_inputs = |model: &mut InferenceModel| -> TractResult<()> {
        for (ix, d) in declared_inputs.iter().enumerate() {
            let (Some(elem_type), Some(dims)) = (proto::elem_type_of(d.elem_type), &d.dims) else {
                return Err(TractError::msg(format!("input `{}` has no shape or type to analyse", d.name)));
            };
            let shape: Vec<TDim> = dims
                .iter()
                .enumerate()
                .map(|(axis, dim)| match dim {
                    ShapeDim::Fixed(n) => TDim::from(*n),
                    ShapeDim::Symbolic(s) if s == UNNAMED => model.sym(&format!("{UNNAMED_SYMBOL}{ix}_{axis}")).into(),
                    ShapeDim::Symbolic(s) => model.sym(s).into(),
                })
                .collect();
            model.set_input_fact(ix, InferenceFact::dt_shape(datum_of(elem_type), shape))?;
        }
        Ok(())
    };
    // A model that loads once pinned may still defeat the symbolic analysis
    // (or panic in it): its outputs are then shown as the file declares them.
    let analysed = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| build(path, &decoded.proto, &set_inputs)))
        .unwrap_or_else(|p| Err(super::panic_text(p)));
    let (outputs, outputs_analysed, value_info_ignored) = match analysed {
        Ok((typed, _, conflict)) => match analysed_outputs(&typed, &decoded) {
            Some(outputs) => (outputs, true, conflict.is_some()),
            None => (file_outputs(&decoded), false, conflict.is_some()),
        },
        Err(reason) => {
            log::debug!("{}: no symbolic analysis ({reason}); outputs as declared", path.display());
            (file_outputs(&decoded), false, false)
        }
    };
    Ok(Description {
        path: path.to_path_buf(),
        name,
        sha256,
        size_bytes: bytes.len() as u64,
        producer: producer(&decoded.proto),
        opset: proto::opset(&decoded.proto),
        other_opsets: other_opsets(&decoded.proto),
        op_counts: decoded.op_counts.clone(),
        quantization: decoded.quantization.clone(),
        rewrites: decoded.rewrites.clone(),
        value_info_ignored,
        inputs,
        outputs,
        outputs_analysed,
    })
}

/// The outputs of tract's graph built with symbolic inputs; `None` when one has no shape or type there.
fn analysed_outputs(typed: &TypedModel, decoded: &Decoded) -> Option<Vec<DeclaredTensor>> {
    proto::declared_outputs(decoded.graph())
        .into_iter()
        .enumerate()
        .map(|(ix, declared)| {
            let name = declared.name;
            let fact = typed.output_fact(ix).ok()?;
            let shape = fact.shape.iter().map(shape_dim).collect();
            // A type the engine does not take keeps its ONNX name, as for the inputs.
            let elem_type = match elem_of(fact.datum_type) {
                Some(t) => t.to_string(),
                None => proto::elem_type_label(declared.elem_type),
            };
            let quantization = match fact.datum_type.qparams() {
                Some(q) => {
                    let (zero_point, scale) = q.zp_scale();
                    Some(QuantParams { scale, zero_point: zero_point as i64 })
                }
                None => decoded.out_q.get(&name).copied(),
            };
            Some(DeclaredTensor { name, shape: Some(shape), elem_type, quantization })
        })
        .collect()
}

/// A dimension of an analysed shape: a size, the expression tract gives it,
/// or unnamed when it depends on a dimension the model gives no name.
fn shape_dim(dim: &TDim) -> ShapeDim {
    if let Some(n) = dim.to_i64().ok().and_then(|n| usize::try_from(n).ok()) {
        return ShapeDim::Fixed(n);
    }
    if dim.symbols().iter().any(|s| s.to_string().starts_with(UNNAMED_SYMBOL)) {
        return ShapeDim::unnamed();
    }
    ShapeDim::Symbolic(dim.to_string())
}

/// The outputs as the file declares them.
fn file_outputs(decoded: &Decoded) -> Vec<DeclaredTensor> {
    proto::declared_outputs(decoded.graph())
        .into_iter()
        .map(|d| DeclaredTensor {
            quantization: decoded.out_q.get(&d.name).copied(),
            elem_type: proto::elem_type_label(d.elem_type),
            shape: d.dims,
            name: d.name,
        })
        .collect()
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
                tract: super::TRACT_VERSION,
            });
        }
    }
    Ok(())
}

/// One pinned input: name, element type, concrete shape.
type Pinned = (String, ElemType, Vec<usize>);

/// Decides the concrete shape of every input: fixed dims from the model,
/// the rest from the caller, a symbolic leading dim defaulting to the batch.
/// Also says whether `batch` decided some input's leading dimension. Inputs
/// left with symbolic dimensions are named together, with a shape to paste.
fn pin_inputs(graph: &pb::GraphProto, opts: &LoadOptions, path: &str) -> Result<(Vec<Pinned>, bool), EngineError> {
    let declared = proto::declared_inputs(graph);
    symbolic::check_shape_names(declared.iter().map(|d| d.name.as_str()), &opts.input_shapes)
        .map_err(|(input, reason)| EngineError::Shape { path: path.into(), input, reason })?;
    let open = symbolic::unpinned(
        declared.iter().map(|d| (d.name.as_str(), d.dims.as_deref())),
        &opts.input_shapes,
        opts.batch,
    );
    if !open.is_empty() {
        return Err(EngineError::Unpinned { path: path.into(), inputs: open });
    }
    let mut pinned = Vec::new();
    let mut batch_filled = false;
    for (ix, input) in declared.iter().enumerate() {
        let err = |reason: String| EngineError::Shape { path: path.into(), input: input.name.clone(), reason };
        let elem_type = proto::elem_type_of(input.elem_type)
            .ok_or_else(|| err(format!("element type {} is not supported", proto::elem_type_name(input.elem_type))))?;
        let given = symbolic::given_shape(&opts.input_shapes, ix, &input.name);
        let shape = match (&input.dims, given) {
            (Some(dims), Some(g)) => {
                if dims.len() != g.len() {
                    return Err(err(format!(
                        "the model declares {} dimensions, the given shape {g:?} has {}",
                        dims.len(),
                        g.len()
                    )));
                }
                for (d, (decl, &want)) in dims.iter().zip(g).enumerate() {
                    if let ShapeDim::Fixed(f) = decl {
                        if *f != want {
                            return Err(err(format!(
                                "dimension {d} is fixed at {f} in the model, the given shape {g:?} says {want}"
                            )));
                        }
                    }
                }
                g.clone()
            }
            (None, Some(g)) => g.clone(),
            // `unpinned` above left only a symbolic leading dimension open.
            (Some(dims), None) => dims
                .iter()
                .map(|decl| match decl {
                    ShapeDim::Fixed(f) => *f,
                    ShapeDim::Symbolic(_) => {
                        batch_filled = true;
                        opts.batch.unwrap_or(1)
                    }
                })
                .collect(),
            (None, None) => {
                return Err(err("the model declares no shape; give one with --input-shape NAME=D0,D1,...".into()))
            }
        };
        if shape.contains(&0) {
            return Err(err(format!("shape {shape:?} has a zero dimension")));
        }
        pinned.push((input.name.clone(), elem_type, shape));
    }
    Ok((pinned, batch_filled))
}
