//! The ONNX front end: decode the protobuf, rewrite what tract lacks, check
//! every operator, pin the inputs and build tract's typed graph. This is the
//! only engine file that needs the ONNX parser (`tract-onnx`); what it
//! produces, a [`TypedModel`] and its [`ModelMeta`], is all the rest of the
//! engine (optimising, running, NNEF conversion and loading) works from.

use std::collections::{BTreeMap, HashMap};
use std::path::Path;
use std::time::Instant;

use tract_core::prelude::TypedModel;
use tract_onnx::pb;
use tract_onnx::prelude::{Framework, InferenceFact, InferenceModelExt};

use super::proto::{self, DeclaredDim};
use super::rewrite;
use super::{datum_of, ms, tract_err, EngineError, LoadOptions, ModelMeta, OutputMeta, QuantParams, TensorSpec, Typed};
use crate::tensor::ElemType;

/// tract-onnx with the operators our QDQ and dynamic quantization rewrites
/// emit (`quant_dequant`, `dyn_quant`).
pub(super) fn framework() -> tract_onnx::Onnx {
    let mut onnx = tract_onnx::onnx();
    super::quant_dequant::register_onnx(&mut onnx);
    super::dyn_quant::register_onnx(&mut onnx);
    onnx
}

/// Builds tract's typed graph from an ONNX file already read into `bytes`.
pub(super) fn load_typed(path: &Path, bytes: &[u8], sha256: String, opts: &LoadOptions) -> Result<Typed, EngineError> {
    let shown = path.display().to_string();
    let t0 = Instant::now();
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
    let (pinned, batch_filled) = pin_inputs(graph, opts, &shown)?;
    let graph = model_proto.graph.as_ref().expect("checked above");
    let inputs: Vec<TensorSpec> = pinned
        .iter()
        .map(|(name, elem_type, shape)| TensorSpec {
            name: name.clone(),
            shape: shape.clone(),
            elem_type: *elem_type,
            quantization: in_q.get(name).copied().map(|(scale, zero_point)| QuantParams { scale, zero_point }),
        })
        .collect();
    let outputs: Vec<OutputMeta> = graph
        .output
        .iter()
        .map(|o| OutputMeta {
            name: o.name.clone(),
            quantization: out_q.get(&o.name).map(|&(scale, zero_point)| QuantParams { scale, zero_point }),
        })
        .collect();
    let decode_ms = ms(t0.elapsed());

    let dir = path.parent().and_then(|p| p.to_str()).map(|s| s.to_string());
    let build = |ignore_value_info: bool| -> Result<(TypedModel, f64), String> {
        let t = Instant::now();
        let tract = framework().with_ignore_value_info(ignore_value_info);
        let parsed = tract.parse(&model_proto, dir.as_deref()).map_err(tract_err)?;
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
    let (mut model, analyse_ms, value_info_ignored) = match build(false) {
        Ok((m, t)) => (m, t, false),
        Err(first) => match build(true) {
            Ok((m, t)) => {
                log::warn!("{shown}: ignoring the model's value_info, which conflicts with its graph ({first})");
                (m, t, true)
            }
            Err(_) => return Err(EngineError::Load { path: shown, reason: first }),
        },
    };

    // The file's free-form metadata (author, class names as a Python dict...) is
    // not used past this point, and tract's NNEF reader rejects a string with a
    // single quote in it, which made such a model's cache entry unreadable.
    model.properties.retain(|k, _| !k.starts_with("onnx.metadata_props."));

    let mut other_opsets = BTreeMap::new();
    for o in &model_proto.opset_import {
        if !(o.domain.is_empty() || o.domain == "ai.onnx") {
            other_opsets.insert(o.domain.clone(), o.version);
        }
    }
    let meta = ModelMeta {
        onnx_path: path.to_path_buf(),
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
        inputs,
        outputs,
        qdq_as_float,
        batch: opts.batch.unwrap_or(1),
        batch_filled,
    };
    Ok(Typed { model, meta, decode_ms, analyse_ms })
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
/// Also says whether `batch` decided some input's leading dimension.
fn pin_inputs(graph: &pb::GraphProto, opts: &LoadOptions, path: &str) -> Result<(Vec<Pinned>, bool), EngineError> {
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
    let mut batch_filled = false;
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
                    DeclaredDim::Symbolic(_) if d == 0 => {
                        batch_filled = true;
                        Ok(opts.batch.unwrap_or(1))
                    }
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
    Ok((pinned, batch_filled))
}
