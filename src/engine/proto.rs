//! Reading facts off the ONNX protobuf: operator counts, quantization style,
//! declared input shapes and the quantization parameters next to the graph's
//! inputs and outputs.

use std::collections::BTreeMap;

use tract_onnx::pb::{self, tensor_proto::DataType, tensor_shape_proto::dimension::Value as Dim};

use super::symbolic::ShapeDim;
use crate::tensor::ElemType;

/// Operator counts keyed `op` (default domain) or `domain:op`.
pub fn op_counts(graph: &pb::GraphProto) -> BTreeMap<String, usize> {
    let mut counts = BTreeMap::new();
    count_ops(graph, &mut counts);
    counts
}

fn count_ops(graph: &pb::GraphProto, counts: &mut BTreeMap<String, usize>) {
    for node in &graph.node {
        let key = match node.domain.as_str() {
            "" | "ai.onnx" => node.op_type.clone(),
            d => format!("{d}:{}", node.op_type),
        };
        *counts.entry(key).or_default() += 1;
        for attr in &node.attribute {
            if let Some(g) = &attr.g {
                count_ops(g, counts);
            }
            for g in &attr.graphs {
                count_ops(g, counts);
            }
        }
    }
}

/// Every node, including those in subgraphs, with the graph it lives in.
pub fn all_nodes(graph: &pb::GraphProto) -> Vec<&pb::NodeProto> {
    let mut out = Vec::new();
    fn walk<'a>(g: &'a pb::GraphProto, out: &mut Vec<&'a pb::NodeProto>) {
        for n in &g.node {
            out.push(n);
            for a in &n.attribute {
                if let Some(sub) = &a.g {
                    walk(sub, out);
                }
                for sub in &a.graphs {
                    walk(sub, out);
                }
            }
        }
    }
    walk(graph, &mut out);
    out
}

/// How a model is quantized, judged from its operators.
pub fn quantization_style(counts: &BTreeMap<String, usize>) -> String {
    let has = |pred: &dyn Fn(&str) -> bool| counts.keys().any(|k| pred(k.rsplit(':').next().unwrap_or(k)));
    let mut styles = Vec::new();
    if has(&|op| op.starts_with("QLinear") || op == "QGemm") {
        styles.push("QOperator");
    }
    if has(&|op| matches!(op, "DynamicQuantizeLinear" | "MatMulInteger" | "ConvInteger")) {
        styles.push("dynamic");
    }
    if styles.is_empty() && has(&|op| matches!(op, "QuantizeLinear" | "DequantizeLinear")) {
        styles.push("QDQ");
    }
    if styles.is_empty() {
        "float (not quantized)".into()
    } else {
        styles.join(" + ")
    }
}

/// The element type an ONNX `elem_type` code stands for, if we support it.
pub fn elem_type_of(code: i32) -> Option<ElemType> {
    Some(match DataType::try_from(code).ok()? {
        DataType::Float => ElemType::F32,
        DataType::Double => ElemType::F64,
        DataType::Int8 => ElemType::I8,
        DataType::Uint8 => ElemType::U8,
        DataType::Int16 => ElemType::I16,
        DataType::Int32 => ElemType::I32,
        DataType::Int64 => ElemType::I64,
        DataType::Bool => ElemType::Bool,
        DataType::String => ElemType::String,
        _ => return None,
    })
}

/// Name of an ONNX `elem_type` code, for error messages.
pub fn elem_type_name(code: i32) -> String {
    DataType::try_from(code).map(|d| d.as_str_name().to_lowercase()).unwrap_or_else(|_| format!("type #{code}"))
}

/// Name of an element type for `inspect`: ours (`f32`) where the engine
/// takes it, else the ONNX name (`float16`), or `?` when the model gives none.
pub fn elem_type_label(code: i32) -> String {
    match elem_type_of(code) {
        Some(t) => t.to_string(),
        None if code == 0 => "?".into(),
        None => elem_type_name(code),
    }
}

/// A graph input or output as the file declares it.
pub struct Declared {
    /// Tensor name.
    pub name: String,
    /// ONNX element type code (0 when the model gives none).
    pub elem_type: i32,
    /// Declared dimensions; `None` when the model gives no shape at all.
    pub dims: Option<Vec<ShapeDim>>,
}

fn declared(value: &pb::ValueInfoProto) -> Declared {
    let tensor = value.r#type.as_ref().and_then(|t| t.value.as_ref()).map(|v| {
        let pb::type_proto::Value::TensorType(t) = v;
        t
    });
    let dims = tensor.and_then(|t| t.shape.as_ref()).map(|s| {
        s.dim
            .iter()
            .map(|d| match &d.value {
                Some(Dim::DimValue(v)) if *v > 0 => ShapeDim::Fixed(*v as usize),
                // tract-onnx reads `?` as unknown too.
                Some(Dim::DimParam(p)) if !p.is_empty() && p != "?" => ShapeDim::Symbolic(p.clone()),
                _ => ShapeDim::unnamed(),
            })
            .collect()
    });
    Declared { name: value.name.clone(), elem_type: tensor.map(|t| t.elem_type).unwrap_or(0), dims }
}

/// The inputs a caller feeds (not shadowed by an initializer), in graph order.
pub fn declared_inputs(graph: &pb::GraphProto) -> Vec<Declared> {
    let inits: std::collections::HashSet<&str> = graph.initializer.iter().map(|t| t.name.as_str()).collect();
    graph.input.iter().filter(|i| !inits.contains(i.name.as_str())).map(declared).collect()
}

/// The outputs, in graph order, as the file declares them.
pub fn declared_outputs(graph: &pb::GraphProto) -> Vec<Declared> {
    graph.output.iter().map(declared).collect()
}

/// Values of a float initializer (scales), if it exists and is float.
pub fn initializer_f32s(graph: &pb::GraphProto, name: &str) -> Option<Vec<f32>> {
    let t = graph.initializer.iter().find(|t| t.name == name)?;
    if t.data_type != DataType::Float as i32 {
        return None;
    }
    if !t.float_data.is_empty() {
        return Some(t.float_data.clone());
    }
    Some(t.raw_data.chunks_exact(4).map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]])).collect())
}

/// Values of an integer initializer (zero points), widened to i64.
pub fn initializer_ints(graph: &pb::GraphProto, name: &str) -> Option<Vec<i64>> {
    let t = graph.initializer.iter().find(|t| t.name == name)?;
    let dt = DataType::try_from(t.data_type).ok()?;
    if !t.int32_data.is_empty() {
        return Some(t.int32_data.iter().map(|&x| x as i64).collect());
    }
    if !t.int64_data.is_empty() {
        return Some(t.int64_data.clone());
    }
    Some(match dt {
        DataType::Int8 => t.raw_data.iter().map(|&b| b as i8 as i64).collect(),
        DataType::Uint8 => t.raw_data.iter().map(|&b| b as i64).collect(),
        DataType::Int32 => {
            t.raw_data.chunks_exact(4).map(|c| i32::from_le_bytes([c[0], c[1], c[2], c[3]]) as i64).collect()
        }
        _ => return None,
    })
}

/// Scale and zero point of a (De)QuantizeLinear node, when both are scalar initializers.
fn qparams_of(graph: &pb::GraphProto, node: &pb::NodeProto) -> Option<(f32, i64)> {
    let scale = initializer_f32s(graph, node.input.get(1)?)?;
    let zp = match node.input.get(2).filter(|s| !s.is_empty()) {
        Some(name) => initializer_ints(graph, name)?,
        None => vec![0],
    };
    (scale.len() == 1 && zp.len() == 1).then(|| (scale[0], zp[0]))
}

/// Quantization parameters seen right after a graph input: the
/// QuantizeLinear that consumes it, or the first QLinear op's input scale.
pub fn input_qparams(graph: &pb::GraphProto, input: &str) -> Option<(f32, i64)> {
    graph
        .node
        .iter()
        .find(|n| n.op_type == "QuantizeLinear" && n.input.first().map(|s| s.as_str()) == Some(input))
        .and_then(|n| qparams_of(graph, n))
}

/// Quantization parameters of the DequantizeLinear that produces a graph output.
pub fn output_qparams(graph: &pb::GraphProto, output: &str) -> Option<(f32, i64)> {
    graph
        .node
        .iter()
        .find(|n| n.op_type == "DequantizeLinear" && n.output.first().map(|s| s.as_str()) == Some(output))
        .and_then(|n| qparams_of(graph, n))
}

/// The default-domain opset version the model imports.
pub fn opset(model: &pb::ModelProto) -> i64 {
    model.opset_import.iter().find(|o| o.domain.is_empty() || o.domain == "ai.onnx").map(|o| o.version).unwrap_or(0)
}
