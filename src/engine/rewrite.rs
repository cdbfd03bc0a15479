//! Graph rewrites applied to the ONNX protobuf before tract sees it.
//!
//! ONNX Runtime's quantizer emits `com.microsoft` QOperator nodes (QLinearAdd,
//! QLinearGlobalAveragePool, QGemm, ...) that tract does not implement. Each
//! has an exact float definition: dequantize the inputs, run the float op,
//! quantize the result. We expand them into that form so tract can load the
//! model; tract then folds the Q/DQ pairs during optimisation.

use std::collections::HashMap;

use tract_onnx::pb::{self, attribute_proto::AttributeType, NodeProto};

/// What one rewrite pass did, for `inspect` and the log.
#[derive(Debug, Default, Clone)]
pub struct RewriteReport {
    /// Expanded op type -> how many nodes.
    pub expanded: std::collections::BTreeMap<String, usize>,
    /// Binary TreeEnsembleClassifier nodes whose label output was recomputed.
    pub tree_labels_fixed: usize,
}

impl RewriteReport {
    /// Human-readable one-liners, e.g. `QLinearAdd x3 -> DequantizeLinear + Add + QuantizeLinear`.
    pub fn lines(&self) -> Vec<String> {
        let mut lines: Vec<String> = self
            .expanded
            .iter()
            .map(|(op, n)| format!("{op} x{n} -> DequantizeLinear + {} + QuantizeLinear", float_op_of(op)))
            .collect();
        if self.tree_labels_fixed > 0 {
            lines.push(format!(
                "TreeEnsembleClassifier x{} (binary): label recomputed as ArgMax + Gather over probabilities",
                self.tree_labels_fixed
            ));
        }
        lines
    }
}

fn float_op_of(op: &str) -> &str {
    match op {
        "QLinearAdd" => "Add",
        "QLinearMul" => "Mul",
        "QLinearGlobalAveragePool" => "GlobalAveragePool",
        "QLinearAveragePool" => "AveragePool",
        "QLinearSigmoid" => "Sigmoid",
        "QLinearLeakyRelu" => "LeakyRelu",
        "QLinearConcat" => "Concat",
        "QGemm" => "Gemm",
        "QLinearConv" => "Conv",
        _ => "?",
    }
}

/// Op types this module knows how to expand.
pub fn is_expandable(op_type: &str) -> bool {
    float_op_of(op_type) != "?"
}

struct Builder<'a> {
    prefix: &'a str,
    counter: usize,
    nodes: Vec<NodeProto>,
}

impl Builder<'_> {
    fn tmp(&mut self, what: &str) -> String {
        self.counter += 1;
        format!("{}__{}_{}", self.prefix, what, self.counter)
    }

    fn node(&mut self, op: &str, inputs: Vec<String>, outputs: Vec<String>, attrs: Vec<pb::AttributeProto>) {
        let name = self.tmp(op);
        self.nodes.push(NodeProto {
            input: inputs,
            output: outputs,
            name,
            op_type: op.to_string(),
            attribute: attrs,
            ..Default::default()
        });
    }

    /// `DequantizeLinear(x, scale[, zp])`; returns the float tensor name.
    fn dq(&mut self, x: &str, scale: &str, zp: Option<&str>, axis: Option<i64>) -> String {
        let out = self.tmp("dq");
        let mut inputs = vec![x.to_string(), scale.to_string()];
        if let Some(zp) = zp.filter(|z| !z.is_empty()) {
            inputs.push(zp.to_string());
        }
        let attrs = axis.map(|a| vec![int_attr("axis", a)]).unwrap_or_default();
        self.node("DequantizeLinear", inputs, vec![out.clone()], attrs);
        out
    }

    /// `QuantizeLinear(x, scale[, zp]) -> y`.
    fn q(&mut self, x: &str, scale: &str, zp: Option<&str>, y: &str) {
        let mut inputs = vec![x.to_string(), scale.to_string()];
        if let Some(zp) = zp.filter(|z| !z.is_empty()) {
            inputs.push(zp.to_string());
        }
        self.node("QuantizeLinear", inputs, vec![y.to_string()], vec![]);
    }
}

fn int_attr(name: &str, v: i64) -> pb::AttributeProto {
    pb::AttributeProto { name: name.into(), r#type: AttributeType::Int as i32, i: v, ..Default::default() }
}

fn float_attr(name: &str, v: f32) -> pb::AttributeProto {
    pb::AttributeProto { name: name.into(), r#type: AttributeType::Float as i32, f: v, ..Default::default() }
}

fn attr_i(node: &NodeProto, name: &str) -> Option<i64> {
    node.attribute.iter().find(|a| a.name == name).map(|a| a.i)
}

fn input(node: &NodeProto, ix: usize) -> Option<&str> {
    node.input.get(ix).map(|s| s.as_str()).filter(|s| !s.is_empty())
}

/// Expands every `com.microsoft` QOperator node tract lacks, and QLinearConv.
/// Fails with a message naming the node when one cannot be expanded faithfully.
pub fn expand_qoperators(graph: &mut pb::GraphProto) -> Result<RewriteReport, String> {
    let mut report = RewriteReport::default();
    let sizes: HashMap<String, usize> =
        graph.initializer.iter().map(|t| (t.name.clone(), t.dims.iter().product::<i64>().max(1) as usize)).collect();
    let old = std::mem::take(&mut graph.node);
    let mut new_nodes = Vec::with_capacity(old.len());
    for node in old {
        // QLinearConv is standard ONNX and tract runs it on integer kernels, but
        // slower than the float kernels with rounded activations that the
        // expansion leads to (see `round_qdq_activations`).
        // (ONNX Runtime's contrib QLinearConv, with its channels_last, is left alone.)
        let domain_ok = match node.op_type.as_str() {
            "QLinearConv" => node.domain.is_empty() || node.domain == "ai.onnx",
            _ => node.domain == "com.microsoft",
        };
        if !is_expandable(&node.op_type) || !domain_ok {
            new_nodes.push(node);
            continue;
        }
        let label =
            if node.name.is_empty() { node.output.first().cloned().unwrap_or_default() } else { node.name.clone() };
        let mut b = Builder { prefix: &label, counter: 0, nodes: vec![] };
        let need =
            |ix: usize| input(&node, ix).ok_or_else(|| format!("node `{label}` ({}) lacks input #{ix}", node.op_type));
        let y = node.output.first().cloned().ok_or_else(|| format!("node `{label}` has no output"))?;
        match node.op_type.as_str() {
            "QLinearAdd" | "QLinearMul" => {
                let a = b.dq(need(0)?, need(1)?, input(&node, 2), None);
                let c = b.dq(need(3)?, need(4)?, input(&node, 5), None);
                let f = b.tmp("f");
                b.node(float_op_of(&node.op_type), vec![a, c], vec![f.clone()], vec![]);
                b.q(&f, need(6)?, input(&node, 7), &y);
            }
            "QLinearGlobalAveragePool" | "QLinearAveragePool" | "QLinearSigmoid" | "QLinearLeakyRelu" => {
                if attr_i(&node, "channels_last").unwrap_or(0) != 0 {
                    return Err(format!(
                        "node `{label}` ({}) uses channels_last=1, which is not supported",
                        node.op_type
                    ));
                }
                let x = b.dq(need(0)?, need(1)?, input(&node, 2), None);
                let f = b.tmp("f");
                let attrs: Vec<_> = node.attribute.iter().filter(|a| a.name != "channels_last").cloned().collect();
                b.node(float_op_of(&node.op_type), vec![x], vec![f.clone()], attrs);
                b.q(&f, need(3)?, input(&node, 4), &y);
            }
            "QLinearConcat" => {
                let rest = &node.input[2..];
                if rest.is_empty() || rest.len() % 3 != 0 {
                    return Err(format!(
                        "node `{label}` (QLinearConcat) has {} inputs, expected 2 + 3*k",
                        node.input.len()
                    ));
                }
                let parts = rest.chunks(3).map(|c| b.dq(&c[0], &c[1], Some(c[2].as_str()), None)).collect::<Vec<_>>();
                let f = b.tmp("f");
                let attrs: Vec<_> = node.attribute.iter().filter(|a| a.name == "axis").cloned().collect();
                b.node("Concat", parts, vec![f.clone()], attrs);
                b.q(&f, need(0)?, input(&node, 1), &y);
            }
            "QLinearConv" => {
                let w_scale = need(4)?;
                // Per output channel: the weights' axis 0, as for the bias.
                let axis = (sizes.get(w_scale).copied().unwrap_or(1) > 1).then_some(0);
                let x = b.dq(need(0)?, need(1)?, input(&node, 2), None);
                let w = b.dq(need(3)?, w_scale, input(&node, 5), axis);
                let mut conv_inputs = vec![x, w];
                if let Some(bias) = input(&node, 8) {
                    // The int32 bias is quantized with scale x_scale * w_scale, zero point 0.
                    let bias_scale = b.tmp("bias_scale");
                    b.node("Mul", vec![need(1)?.to_string(), w_scale.to_string()], vec![bias_scale.clone()], vec![]);
                    conv_inputs.push(b.dq(bias, &bias_scale, None, axis));
                }
                let f = b.tmp("f");
                b.node("Conv", conv_inputs, vec![f.clone()], node.attribute.clone());
                b.q(&f, need(6)?, input(&node, 7), &y);
            }
            "QGemm" => {
                let trans_b = attr_i(&node, "transB").unwrap_or(0);
                let b_scale = need(4)?;
                let per_channel = sizes.get(b_scale).copied().unwrap_or(1) > 1;
                let a = b.dq(need(0)?, need(1)?, input(&node, 2), None);
                let w_axis = per_channel.then_some(if trans_b != 0 { 0 } else { 1 });
                let w = b.dq(need(3)?, b_scale, input(&node, 5), w_axis);
                let mut gemm_inputs = vec![a, w];
                if let Some(c) = input(&node, 6) {
                    // The int32 bias is quantized with scale a_scale * b_scale, zero point 0.
                    let c_scale = b.tmp("bias_scale");
                    b.node("Mul", vec![need(1)?.to_string(), b_scale.to_string()], vec![c_scale.clone()], vec![]);
                    gemm_inputs.push(b.dq(c, &c_scale, None, per_channel.then_some(0)));
                }
                let attrs: Vec<_> = node
                    .attribute
                    .iter()
                    .filter(|a| matches!(a.name.as_str(), "alpha" | "transA" | "transB"))
                    .cloned()
                    .collect();
                match input(&node, 7) {
                    Some(y_scale) => {
                        let f = b.tmp("f");
                        b.node("Gemm", gemm_inputs, vec![f.clone()], attrs);
                        b.q(&f, y_scale, input(&node, 8), &y);
                    }
                    None => b.node("Gemm", gemm_inputs, vec![y.clone()], attrs),
                }
            }
            _ => unreachable!("is_expandable covers every arm"),
        }
        *report.expanded.entry(node.op_type.clone()).or_default() += 1;
        new_nodes.extend(b.nodes);
    }
    graph.node = new_nodes;
    Ok(report)
}

/// Works around tract 0.23's binary TreeEnsembleClassifier, whose `label`
/// output is always the first class: it takes the argmax over the single
/// positive-class score column instead of over `[1 - p, p]`. We recompute the
/// label the way ONNX Runtime does (positive class when p > 0.5, i.e. argmax of
/// the two-column probabilities tract does output correctly) and drop tract's.
/// Returns how many nodes were patched.
pub fn fix_binary_tree_labels(graph: &mut pb::GraphProto) -> usize {
    let mut added_nodes = Vec::new();
    let mut added_inits = Vec::new();
    for node in graph.node.iter_mut().filter(|n| n.op_type == "TreeEnsembleClassifier") {
        let ints = |name: &str| node.attribute.iter().find(|a| a.name == name).map(|a| a.ints.clone());
        let (Some(class_ids), Some(labels)) = (ints("class_ids"), ints("classlabels_int64s")) else { continue };
        let weights_non_negative = node
            .attribute
            .iter()
            .find(|a| a.name == "class_weights")
            .is_none_or(|a| a.floats.iter().all(|&w| w >= 0.0));
        let binary = labels.len() == 2 && class_ids.iter().all(|&c| c == 0);
        let (Some(label), Some(probs)) = (input_or_none(&node.output, 0), input_or_none(&node.output, 1)) else {
            continue;
        };
        if !binary || !weights_non_negative {
            continue;
        }
        let unused = format!("{label}__tract_label_unused");
        let index = format!("{label}__argmax");
        let classes = format!("{label}__classes");
        node.output[0] = unused;
        added_nodes.push(NodeProto {
            input: vec![probs.clone()],
            output: vec![index.clone()],
            name: format!("{label}__argmax_node"),
            op_type: "ArgMax".into(),
            attribute: vec![int_attr("axis", 1), int_attr("keepdims", 0)],
            ..Default::default()
        });
        added_nodes.push(NodeProto {
            input: vec![classes.clone(), index],
            output: vec![label.clone()],
            name: format!("{label}__gather_node"),
            op_type: "Gather".into(),
            attribute: vec![int_attr("axis", 0)],
            ..Default::default()
        });
        added_inits.push(pb::TensorProto {
            name: classes,
            dims: vec![2],
            data_type: pb::tensor_proto::DataType::Int64 as i32,
            int64_data: labels,
            ..Default::default()
        });
    }
    let patched = added_inits.len();
    graph.node.extend(added_nodes);
    graph.initializer.extend(added_inits);
    patched
}

fn input_or_none(names: &[String], ix: usize) -> Option<String> {
    names.get(ix).filter(|s| !s.is_empty()).cloned()
}

/// One activation QuantizeLinear whose every consumer is a DequantizeLinear
/// with the same scale and zero point: a pair that tract would run as a
/// quantize and a dequantize pass over the whole activation.
struct QdqPair {
    /// The QuantizeLinear node.
    q: usize,
    /// Its DequantizeLinear consumers, in node order.
    dqs: Vec<usize>,
    /// The per-tensor scale.
    scale: f32,
    /// The zero point.
    zero_point: i64,
    /// Whether the quantized type is int8 (else uint8).
    signed: bool,
}

impl QdqPair {
    /// The quantized range relative to the zero point, in quantization steps:
    /// `DQ(Q(x)) = clip(round(x / scale), lo, hi) * scale` exactly.
    fn steps(&self) -> (f32, f32) {
        let (qmin, qmax) = if self.signed { (-128.0, 127.0) } else { (0.0, 255.0) };
        (qmin - self.zero_point as f32, qmax - self.zero_point as f32)
    }
}

/// Every activation Q -> DQ pair with per-tensor parameters from initializers.
/// A QuantizeLinear that is a graph output or has any other consumer is left alone.
fn activation_qdq_pairs(graph: &pb::GraphProto) -> Vec<QdqPair> {
    let mut consumers: HashMap<&str, Vec<usize>> = HashMap::new();
    for (ix, n) in graph.node.iter().enumerate() {
        for i in &n.input {
            consumers.entry(i.as_str()).or_default().push(ix);
        }
    }
    let outputs: std::collections::HashSet<&str> = graph.output.iter().map(|o| o.name.as_str()).collect();
    let zp_type = |name: &str| graph.initializer.iter().find(|t| t.name == name).map(|t| t.data_type);
    let mut pairs = Vec::new();
    for (qix, q) in graph.node.iter().enumerate() {
        if q.op_type != "QuantizeLinear" || q.input.len() < 2 || q.output.len() != 1 {
            continue;
        }
        let Some(scale) = super::proto::initializer_f32s(graph, &q.input[1]).filter(|s| s.len() == 1).map(|s| s[0])
        else {
            continue;
        };
        let zp_name = q.input.get(2).filter(|s| !s.is_empty());
        let (zero_point, signed) = match zp_name {
            Some(name) => match (super::proto::initializer_ints(graph, name), zp_type(name)) {
                (Some(v), Some(t)) if v.len() == 1 => (v[0], t == pb::tensor_proto::DataType::Int8 as i32),
                _ => continue,
            },
            None => (0, false),
        };
        let out = q.output[0].as_str();
        if outputs.contains(out) {
            continue;
        }
        let Some(users) = consumers.get(out) else { continue };
        let same_params = users.iter().all(|&u| {
            let d = &graph.node[u];
            d.op_type == "DequantizeLinear"
                && d.input.first().map(|s| s.as_str()) == Some(out)
                && d.input.get(1) == q.input.get(1)
                && d.input.get(2).filter(|s| !s.is_empty()) == zp_name
        });
        if same_params && !users.is_empty() && scale.is_finite() && scale > 0.0 {
            pairs.push(QdqPair { q: qix, dqs: users.clone(), scale, zero_point, signed });
        }
    }
    pairs
}

/// What replaces one pair: nodes computing a shared value from the
/// QuantizeLinear's input (placed where its first consumer was), and the
/// op that turns that value into each DequantizeLinear's output.
struct Replacement {
    shared: Vec<NodeProto>,
    initializers: Vec<pb::TensorProto>,
    /// The op and inputs of the node that takes each DequantizeLinear's place.
    last_op: &'static str,
    last_inputs: Vec<String>,
    /// Its attributes.
    last_attrs: Vec<pb::AttributeProto>,
}

/// Replaces every pair as `make` says, keeping topological order.
fn replace_pairs(graph: &mut pb::GraphProto, pairs: &[QdqPair], make: impl Fn(&QdqPair, &str, &str) -> Replacement) {
    let mut remove = std::collections::HashSet::new();
    let mut placed: HashMap<usize, Vec<NodeProto>> = HashMap::new();
    let mut added_inits = Vec::new();
    for pair in pairs {
        let x = graph.node[pair.q].input[0].clone();
        let base = graph.node[pair.q].output[0].clone();
        let mut r = make(pair, &x, &base);
        remove.insert(pair.q);
        added_inits.append(&mut r.initializers);
        for &u in &pair.dqs {
            remove.insert(u);
            // The shared nodes go before the first consumer only; the others find them there.
            let mut nodes = std::mem::take(&mut r.shared);
            nodes.push(NodeProto {
                input: r.last_inputs.clone(),
                output: vec![graph.node[u].output[0].clone()],
                name: format!("{}__{}", graph.node[u].name, r.last_op.to_lowercase()),
                op_type: r.last_op.into(),
                attribute: r.last_attrs.clone(),
                ..Default::default()
            });
            placed.insert(u, nodes);
        }
    }
    let old = std::mem::take(&mut graph.node);
    for (ix, n) in old.into_iter().enumerate() {
        match placed.remove(&ix) {
            Some(nodes) => graph.node.extend(nodes),
            None if remove.contains(&ix) => {}
            None => graph.node.push(n),
        }
    }
    graph.initializer.extend(added_inits);
}

fn f32_scalar(name: &str, v: f32) -> pb::TensorProto {
    pb::TensorProto {
        name: name.into(),
        data_type: pb::tensor_proto::DataType::Float as i32,
        float_data: vec![v],
        ..Default::default()
    }
}

/// The default path for QDQ models: replaces each activation's
/// QuantizeLinear -> DequantizeLinear pair by one `EdgeinferQuantDequant` node
/// (see `quant_dequant`), which computes the same values in one element-wise
/// pass: `x / scale` (as a multiplication by `1 / scale`, like tract's own
/// pair), clipped to the quantized range, rounded half to even, `* scale`.
/// tract's own pair costs two passes and two type conversions; the same
/// arithmetic as separate float ops costs eleven graph nodes, which tract's
/// optimiser is slow on. Parity with ONNX Runtime is unchanged.
/// Returns how many pairs were replaced.
pub fn round_qdq_activations(graph: &mut pb::GraphProto) -> usize {
    let pairs = activation_qdq_pairs(graph);
    replace_pairs(graph, &pairs, |pair, x, base| {
        let (lo, hi) = pair.steps();
        let attrs = vec![float_attr("scale", pair.scale), float_attr("lo", lo), float_attr("hi", hi)];
        if pair.dqs.len() == 1 {
            return Replacement {
                shared: Vec::new(),
                initializers: Vec::new(),
                last_op: super::quant_dequant::ONNX_OP,
                last_inputs: vec![x.into()],
                last_attrs: attrs,
            };
        }
        // Several consumers share one pass; each DequantizeLinear becomes an
        // Identity of it, which tract removes.
        let shared = format!("{base}__quant_dequant");
        let mut b = Builder { prefix: base, counter: 0, nodes: vec![] };
        b.node(super::quant_dequant::ONNX_OP, vec![x.into()], vec![shared.clone()], attrs);
        Replacement {
            shared: b.nodes,
            initializers: Vec::new(),
            last_op: "Identity",
            last_inputs: vec![shared],
            last_attrs: Vec::new(),
        }
    });
    pairs.len()
}

/// The float path for QDQ models (`qdq_as_float`): replaces each activation's
/// QuantizeLinear -> DequantizeLinear pair by the Clip to the quantized range
/// it implies (the quantizer relies on that saturation for Relu/Relu6), so
/// tract runs float kernels without rounding every activation. Weights keep
/// their int8 values (their DequantizeLinear folds to constants at load); only
/// activation rounding is lost, which the parity tests bound. Returns how many
/// pairs were folded.
pub fn fold_qdq_activations(graph: &mut pb::GraphProto) -> usize {
    let pairs = activation_qdq_pairs(graph);
    replace_pairs(graph, &pairs, |pair, x, base| {
        let (lo, hi) = pair.steps();
        let (lo_name, hi_name) = (format!("{base}__clip_lo"), format!("{base}__clip_hi"));
        Replacement {
            shared: Vec::new(),
            initializers: vec![f32_scalar(&lo_name, lo * pair.scale), f32_scalar(&hi_name, hi * pair.scale)],
            last_op: "Clip",
            last_inputs: vec![x.into(), lo_name, hi_name],
            last_attrs: Vec::new(),
        }
    });
    pairs.len()
}

/// Computes every DequantizeLinear whose inputs are all initializers (the
/// weights and biases of a QDQ or QOperator model) into a float initializer,
/// with tract's own arithmetic, so the values do not change: per tensor
/// `(x - zero_point)` in i32, then `as f32 * scale`; per axis
/// `(x as f32 - zero_point as f32) * scale`. Left to tract they are computed
/// while it analyses the graph, with generic broadcasting loops: 458 of the
/// 622 ms an int8 MobileNetV2's cold load took. An initializer that is also a
/// graph input (old IR versions), which a caller may override, is left alone.
/// Returns how many were computed.
pub fn fold_constant_dequantize(graph: &mut pb::GraphProto) -> usize {
    use pb::tensor_proto::DataType;
    let outputs: std::collections::HashSet<String> = graph.output.iter().map(|o| o.name.clone()).collect();
    let inputs: std::collections::HashSet<String> = graph.input.iter().map(|i| i.name.clone()).collect();
    let dtype = |name: &str| graph.initializer.iter().find(|t| t.name == name).map(|t| (t.data_type, t.dims.clone()));
    let mut folded: HashMap<usize, pb::TensorProto> = HashMap::new();
    for (ix, n) in graph.node.iter().enumerate() {
        if n.op_type != "DequantizeLinear" || n.output.len() != 1 || n.input.len() < 2 || outputs.contains(&n.output[0])
        {
            continue;
        }
        if n.input.iter().any(|i| inputs.contains(i)) {
            continue;
        }
        // Blocked quantization (opset 21) has its own layout of scales.
        if attr_i(n, "block_size").unwrap_or(0) != 0 {
            continue;
        }
        let Some((x_type, dims)) = dtype(&n.input[0]) else { continue };
        if ![DataType::Int8 as i32, DataType::Uint8 as i32, DataType::Int32 as i32].contains(&x_type)
            || dims.iter().any(|&d| d < 0)
        {
            continue;
        }
        let count: usize = dims.iter().map(|&d| d as usize).product();
        let (Some(xs), Some(scales)) =
            (super::proto::initializer_ints(graph, &n.input[0]), super::proto::initializer_f32s(graph, &n.input[1]))
        else {
            continue;
        };
        let zps = match input(n, 2) {
            Some(zp) => match (super::proto::initializer_ints(graph, zp), dtype(zp)) {
                (Some(v), Some((t, _))) if t == x_type => v,
                _ => continue,
            },
            None => vec![0],
        };
        if xs.len() != count || scales.is_empty() {
            continue;
        }
        let values: Vec<f32> = if scales.len() == 1 && zps.len() == 1 {
            let (scale, zp) = (scales[0], zps[0] as i32);
            xs.iter().map(|&x| (x as i32).wrapping_sub(zp) as f32 * scale).collect()
        } else {
            let rank = dims.len() as i64;
            let axis = attr_i(n, "axis").unwrap_or(1);
            let axis = if axis < 0 { axis + rank } else { axis };
            if !(0..rank).contains(&axis) {
                continue;
            }
            let channels = dims[axis as usize] as usize;
            let per = |v: &[f32], c: usize| if v.len() == 1 { v[0] } else { v[c] };
            if !(scales.len() == 1 || scales.len() == channels) || !(zps.len() == 1 || zps.len() == channels) {
                continue;
            }
            let zps: Vec<f32> = zps.iter().map(|&z| z as f32).collect();
            let inner: usize = dims[axis as usize + 1..].iter().map(|&d| d as usize).product();
            xs.iter()
                .enumerate()
                .map(|(i, &x)| {
                    let c = (i / inner.max(1)) % channels.max(1);
                    (x as f32 - per(&zps, c)) * per(&scales, c)
                })
                .collect()
        };
        folded.insert(
            ix,
            pb::TensorProto {
                name: n.output[0].clone(),
                dims,
                data_type: DataType::Float as i32,
                raw_data: values.iter().flat_map(|v| v.to_le_bytes()).collect(),
                ..Default::default()
            },
        );
    }
    let count = folded.len();
    let mut inputs_of_folded = std::collections::HashSet::new();
    let old = std::mem::take(&mut graph.node);
    for (ix, n) in old.into_iter().enumerate() {
        match folded.remove(&ix) {
            Some(t) => {
                inputs_of_folded.extend(n.input);
                graph.initializer.push(t);
            }
            None => graph.node.push(n),
        }
    }
    // The integer weights nothing else reads are dropped, so tract does not load them;
    // a name listed as a graph input (old IR versions list initializers there) stays.
    let used: std::collections::HashSet<&str> = super::proto::all_nodes(graph)
        .iter()
        .flat_map(|n| n.input.iter().map(|s| s.as_str()))
        .chain(graph.input.iter().map(|i| i.name.as_str()))
        .chain(graph.output.iter().map(|o| o.name.as_str()))
        .collect();
    let unused: std::collections::HashSet<String> =
        inputs_of_folded.into_iter().filter(|name| !used.contains(name.as_str())).collect();
    graph.initializer.retain(|t| !unused.contains(&t.name));
    count
}

/// One ConvInteger or MatMulInteger of a dynamically quantized model, with
/// the nodes around it that [`lower_dynamic_quantization`] replaces.
struct DynamicProduct {
    /// The DynamicQuantizeLinear that quantizes the activation.
    dql: usize,
    /// The ConvInteger or MatMulInteger.
    product: usize,
    /// The Cast of its sums to float.
    cast: usize,
    /// The Mul by `x_scale * w_scale`, whose output the float product takes over.
    mul: usize,
    /// The weights' scale initializer.
    w_scale: String,
    /// The axis of per-channel weight scales (MatMulInteger's columns).
    axis: Option<i64>,
    /// For a convolution: the bias `Add` after the Mul, with the 1-D
    /// initializer of one value per output channel it adds (through the
    /// Reshape to `[1, O, 1, 1]` that `quantize_dynamic` writes). The float
    /// convolution takes it as its bias and the Add's output, so the bias is
    /// added inside the convolution (our depthwise operator folds no Add).
    bias: Option<(usize, String)>,
}

/// Every ConvInteger / MatMulInteger laid out as `quantize_dynamic` writes
/// them: `DynamicQuantizeLinear(x) -> product(x_q, w_q, x_zp[, w_zp]) ->
/// Cast(float) -> Mul(Mul(x_scale, w_scale))`, with constant weights, their
/// zero point and scale. Anything else is left to tract's integer operators.
fn dynamic_products(graph: &pb::GraphProto) -> Vec<DynamicProduct> {
    let mut producer: HashMap<&str, usize> = HashMap::new();
    let mut consumers: HashMap<&str, Vec<usize>> = HashMap::new();
    for (ix, n) in graph.node.iter().enumerate() {
        for o in &n.output {
            producer.insert(o.as_str(), ix);
        }
        for i in &n.input {
            consumers.entry(i.as_str()).or_default().push(ix);
        }
    }
    let outputs: std::collections::HashSet<&str> = graph.output.iter().map(|o| o.name.as_str()).collect();
    let inputs: std::collections::HashSet<&str> = graph.input.iter().map(|i| i.name.as_str()).collect();
    let init = |name: &str| graph.initializer.iter().find(|t| t.name == name).filter(|_| !inputs.contains(name));
    // The single consumer of `name`, when it is not also a graph output.
    let only_user = |name: &str| match consumers.get(name).map(|v| v.as_slice()) {
        Some(&[u]) if !outputs.contains(name) => Some(u),
        _ => None,
    };
    let mut found = Vec::new();
    for (ix, n) in graph.node.iter().enumerate() {
        let conv = match n.op_type.as_str() {
            "ConvInteger" => true,
            "MatMulInteger" => false,
            _ => continue,
        };
        let Some(&dql) = input(n, 0).and_then(|x| producer.get(x)) else { continue };
        let d = &graph.node[dql];
        if d.op_type != "DynamicQuantizeLinear" || d.output.len() != 3 || input(n, 2) != Some(d.output[2].as_str()) {
            continue;
        }
        let Some(w) = input(n, 1).and_then(init) else { continue };
        let int8 = [pb::tensor_proto::DataType::Int8 as i32, pb::tensor_proto::DataType::Uint8 as i32];
        if !int8.contains(&w.data_type) || w.dims.iter().any(|&d| d < 0) || (!conv && w.dims.len() != 2) {
            continue;
        }
        let w_zp = input(n, 3);
        if w_zp.is_some_and(|z| init(z).is_none_or(|t| t.data_type != w.data_type)) {
            continue;
        }
        let Some(cast) = n.output.first().and_then(|o| only_user(o)) else { continue };
        let c = &graph.node[cast];
        if c.op_type != "Cast" || attr_i(c, "to") != Some(pb::tensor_proto::DataType::Float as i64) {
            continue;
        }
        let Some(mul) = only_user(&c.output[0]) else { continue };
        let m = &graph.node[mul];
        if m.op_type != "Mul" || m.input.len() != 2 || m.output.len() != 1 {
            continue;
        }
        let other = if m.input[0] == c.output[0] { &m.input[1] } else { &m.input[0] };
        let Some(&scales) = producer.get(other.as_str()) else { continue };
        let s = &graph.node[scales];
        let x_scale = d.output[1].as_str();
        if s.op_type != "Mul" || s.input.len() != 2 || !s.input.iter().any(|i| i == x_scale) {
            continue;
        }
        let w_scale = if s.input[0] == x_scale { &s.input[1] } else { &s.input[0] };
        let (Some(t), Some(values)) = (init(w_scale), super::proto::initializer_f32s(graph, w_scale)) else { continue };
        let columns = w.dims.last().copied().unwrap_or(0) as usize;
        let zps = w_zp.and_then(|z| super::proto::initializer_ints(graph, z)).map_or(1, |v| v.len());
        // A convolution's sums are scaled per tensor (a per-channel scale
        // would need a reshape to broadcast); a matrix product's per column.
        let axis = match (values.len(), zps) {
            (1, 1) if t.dims.iter().all(|&d| d == 1) => None,
            (v, z) if !conv && v == columns && t.dims.len() == 1 && (z == 1 || z == columns) => Some(1),
            _ => continue,
        };
        if values.iter().any(|v| !v.is_finite()) {
            continue;
        }
        let bias = if conv { conv_bias(graph, &consumers, &outputs, mul, w.dims[0]) } else { None };
        found.push(DynamicProduct { dql, product: ix, cast, mul, w_scale: w_scale.clone(), axis, bias });
    }
    found
}

/// The bias `Add` that is the only reader of node `mul`'s output, when it
/// adds `Reshape(b, shape)` with `b` a 1-D f32 initializer of `channels`
/// values and a shape of `[1, channels or -1, 1, ...]`: the Add and `b`'s name.
fn conv_bias(
    graph: &pb::GraphProto,
    consumers: &HashMap<&str, Vec<usize>>,
    outputs: &std::collections::HashSet<&str>,
    mul: usize,
    channels: i64,
) -> Option<(usize, String)> {
    let out = graph.node[mul].output[0].as_str();
    let &[add] = consumers.get(out)?.as_slice() else { return None };
    let a = &graph.node[add];
    if outputs.contains(out) || a.op_type != "Add" || a.input.len() != 2 {
        return None;
    }
    let other = if a.input[0] == out { &a.input[1] } else { &a.input[0] };
    let reshape = graph.node.iter().find(|n| n.output.first() == Some(other))?;
    if reshape.op_type != "Reshape" || reshape.input.len() != 2 {
        return None;
    }
    let b = graph.initializer.iter().find(|t| t.name == reshape.input[0])?;
    let shape = super::proto::initializer_ints(graph, &reshape.input[1])?;
    // `quantize_dynamic` writes `[1, -1, 1, 1]`: -1 takes the bias's length.
    let per_channel = shape.len() >= 2
        && (shape[1] == channels || shape[1] == -1)
        && shape.iter().enumerate().all(|(i, &d)| i == 1 || d == 1);
    let f32_values = b.data_type == pb::tensor_proto::DataType::Float as i32;
    (per_channel && f32_values && b.dims == [channels] && !graph.input.iter().any(|i| i.name == b.name))
        .then(|| (add, b.name.clone()))
}

/// The default path for dynamically quantized models: replaces each
/// [`dynamic_products`] chain by `EdgeinferDynamicQuantDequant` on the
/// activation (see `dyn_quant`; one per DynamicQuantizeLinear, shared by
/// its products) and a float Conv or MatMul of the weights' DequantizeLinear,
/// which [`fold_constant_dequantize`] then computes into float weights. The
/// DynamicQuantizeLinear and scale product nodes go when nothing else reads
/// them. Returns how many products were replaced.
pub fn lower_dynamic_quantization(graph: &mut pb::GraphProto) -> usize {
    let found = dynamic_products(graph);
    if found.is_empty() {
        return 0;
    }
    let mut placed: HashMap<usize, Vec<NodeProto>> = HashMap::new();
    let mut remove = std::collections::HashSet::new();
    let mut rounded: HashMap<usize, String> = HashMap::new();
    for p in &found {
        let d = &graph.node[p.dql];
        let r = rounded.entry(p.dql).or_insert_with(|| {
            let out = format!("{}__dyn_rounded", d.output[0]);
            let node = NodeProto {
                input: vec![d.input[0].clone()],
                output: vec![out.clone()],
                name: format!("{}__dyn_quant_dequant", if d.name.is_empty() { &d.output[0] } else { &d.name }),
                op_type: super::dyn_quant::ONNX_OP.into(),
                ..Default::default()
            };
            placed.entry(p.dql).or_default().push(node);
            out
        });
        let n = &graph.node[p.product];
        let base = if n.name.is_empty() { n.output[0].clone() } else { n.name.clone() };
        let mut b = Builder { prefix: &base, counter: 0, nodes: vec![] };
        let w = b.dq(&n.input[1], &p.w_scale, input(n, 3), p.axis);
        let (op, attrs) = if n.op_type == "ConvInteger" { ("Conv", n.attribute.clone()) } else { ("MatMul", vec![]) };
        let mut inputs = vec![r.clone(), w];
        // With its bias, the convolution takes the Add's place and output.
        let (out_node, bias) = match &p.bias {
            Some((add, b)) => (*add, Some(b.clone())),
            None => (p.mul, None),
        };
        inputs.extend(bias);
        let out = graph.node[out_node].output[0].clone();
        b.nodes.push(NodeProto {
            input: inputs,
            output: vec![out],
            name: format!("{base}__float"),
            op_type: op.into(),
            attribute: attrs,
            ..Default::default()
        });
        placed.entry(out_node).or_default().extend(b.nodes);
        remove.extend([p.product, p.cast, p.mul]);
        remove.extend(p.bias.as_ref().map(|(add, _)| *add));
    }
    let old = std::mem::take(&mut graph.node);
    for (ix, n) in old.into_iter().enumerate() {
        let keep = !remove.contains(&ix);
        let new = placed.remove(&ix).unwrap_or_default();
        // The rounding goes before its DynamicQuantizeLinear (which may go),
        // a float product where its Mul (or its bias Add) was.
        if keep {
            graph.node.extend(new.iter().filter(|m| m.op_type == super::dyn_quant::ONNX_OP).cloned());
            graph.node.push(n);
            graph.node.extend(new.into_iter().filter(|m| m.op_type != super::dyn_quant::ONNX_OP));
        } else {
            graph.node.extend(new);
        }
    }
    drop_unread(graph, &["DynamicQuantizeLinear", "Mul", "Reshape"]);
    found.len()
}

/// Removes nodes of the kinds `ops` none of whose outputs is read (by a
/// node or as a graph output), until none is left.
fn drop_unread(graph: &mut pb::GraphProto, ops: &[&str]) {
    loop {
        let read: std::collections::HashSet<String> = super::proto::all_nodes(graph)
            .iter()
            .flat_map(|n| n.input.iter().cloned())
            .chain(graph.output.iter().map(|o| o.name.clone()))
            .collect();
        let before = graph.node.len();
        graph.node.retain(|n| !ops.contains(&n.op_type.as_str()) || n.output.iter().any(|o| read.contains(o)));
        if graph.node.len() == before {
            return;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tract_onnx::prelude::*;

    /// `x -> QuantizeLinear(scale, zp) -> DequantizeLinear -> Relu -> y`, x: f32 [n].
    fn qdq_graph(n: usize, scale: f32, zp: i32, signed: bool) -> pb::ModelProto {
        let dt = if signed { pb::tensor_proto::DataType::Int8 } else { pb::tensor_proto::DataType::Uint8 };
        let zp_init =
            pb::TensorProto { name: "zp".into(), data_type: dt as i32, int32_data: vec![zp], ..Default::default() };
        let mut b = Builder { prefix: "t", counter: 0, nodes: vec![] };
        b.q("x", "s", Some("zp"), "q");
        b.node("DequantizeLinear", vec!["q".into(), "s".into(), "zp".into()], vec!["dq".into()], vec![]);
        b.node("Relu", vec!["dq".into()], vec!["y".into()], vec![]);
        let graph = pb::GraphProto {
            node: b.nodes,
            initializer: vec![f32_scalar("s", scale), zp_init],
            input: vec![f32_value("x", &[n as i64])],
            output: vec![f32_value("y", &[n as i64])],
            ..Default::default()
        };
        model_of(graph)
    }

    /// An f32 graph input or output of a fixed shape.
    fn f32_value(name: &str, dims: &[i64]) -> pb::ValueInfoProto {
        pb::ValueInfoProto {
            name: name.into(),
            r#type: Some(pb::TypeProto {
                value: Some(pb::type_proto::Value::TensorType(pb::type_proto::Tensor {
                    elem_type: pb::tensor_proto::DataType::Float as i32,
                    shape: Some(pb::TensorShapeProto {
                        dim: dims
                            .iter()
                            .map(|&d| pb::tensor_shape_proto::Dimension {
                                value: Some(pb::tensor_shape_proto::dimension::Value::DimValue(d)),
                                ..Default::default()
                            })
                            .collect(),
                    }),
                })),
                ..Default::default()
            }),
            ..Default::default()
        }
    }

    fn model_of(graph: pb::GraphProto) -> pb::ModelProto {
        pb::ModelProto {
            ir_version: 8,
            opset_import: vec![pb::OperatorSetIdProto { domain: String::new(), version: 17 }],
            graph: Some(graph),
            ..Default::default()
        }
    }

    fn run(proto: &pb::ModelProto, x: &[f32]) -> Vec<f32> {
        run_all(proto, x).remove(0)
    }

    /// ONNX's definition of DequantizeLinear(QuantizeLinear(x)) followed by Relu, with
    /// `x * (1 / scale)` for ONNX's `x / scale`, as tract computes it (a value within one
    /// ulp of a tie may round the other way than with a division).
    fn reference(x: f32, scale: f32, zp: i32, signed: bool) -> f32 {
        let (qmin, qmax) = if signed { (-128.0, 127.0) } else { (0.0, 255.0) };
        let q = ((x * (1.0 / scale)).round_ties_even() + zp as f32).clamp(qmin, qmax);
        ((q - zp as f32) * scale).max(0.0)
    }

    #[test]
    fn rounded_pairs_compute_what_quantize_dequantize_does() {
        // Not a power of two, so that 1 / scale is inexact (MobileNetV2's output scale).
        let scale = 0.05259862f32;
        // Ties (k + 0.5 steps) both ways, values just off them, zero, and far beyond the range.
        let mut x: Vec<f32> = (-40..=40).map(|k| (k as f32 + 0.5) * scale).collect();
        x.extend((-40..=40).map(|k| k as f32 * scale * 1.01));
        x.extend([0.0, -0.0, 1e6, -1e6, 63.8, 64.1, -32.1, -31.9]);
        // One ulp either side of each tie, where x / scale and x * (1 / scale) can disagree.
        for k in -130..130 {
            let tie = (k as f32 + 0.5) * scale;
            x.extend([f32::from_bits(tie.to_bits() - 1), f32::from_bits(tie.to_bits() + 1)]);
        }
        for (zp, signed) in [(0, true), (-7, true), (0, false), (135, false)] {
            let proto = qdq_graph(x.len(), scale, zp, signed);
            let as_quantized = run(&proto, &x);
            let mut rewritten = proto.clone();
            assert_eq!(round_qdq_activations(rewritten.graph.as_mut().unwrap()), 1);
            let ops: Vec<&str> = rewritten.graph.as_ref().unwrap().node.iter().map(|n| n.op_type.as_str()).collect();
            assert_eq!(ops, ["EdgeinferQuantDequant", "Relu"], "zp {zp} signed {signed}");
            let rounded = run(&rewritten, &x);
            for (i, &v) in x.iter().enumerate() {
                let want = reference(v, scale, zp, signed);
                assert_eq!(rounded[i], as_quantized[i], "x {v} zp {zp} signed {signed}: rewritten vs tract's Q/DQ");
                assert_eq!(rounded[i], want, "x {v} zp {zp} signed {signed}: rewritten vs the definition");
            }
        }
    }

    #[test]
    fn a_pair_with_two_consumers_is_computed_once_for_both() {
        let scale = 0.1f32;
        let x = [0.04f32, 0.05, 0.15, -3.0, 30.0];
        let mut proto = qdq_graph(x.len(), scale, 0, true);
        let graph = proto.graph.as_mut().unwrap();
        let mut b = Builder { prefix: "t", counter: 0, nodes: vec![] };
        b.node("DequantizeLinear", vec!["q".into(), "s".into(), "zp".into()], vec!["dq2".into()], vec![]);
        b.node("Neg", vec!["dq2".into()], vec!["y2".into()], vec![]);
        graph.node.extend(b.nodes);
        let y = graph.output[0].clone();
        graph.output.push(pb::ValueInfoProto { name: "y2".into(), ..y });
        let before = run_all(&proto, &x);
        assert_eq!(round_qdq_activations(proto.graph.as_mut().unwrap()), 1);
        let ops: Vec<&str> = proto.graph.as_ref().unwrap().node.iter().map(|n| n.op_type.as_str()).collect();
        assert_eq!(ops, ["EdgeinferQuantDequant", "Identity", "Relu", "Identity", "Neg"]);
        let after = run_all(&proto, &x);
        assert_eq!(after, before);
        // Saturated at 127 steps, then each consumer's own op.
        assert_eq!((after[0][4], after[1][4]), (127.0 * scale, -(127.0 * scale)));
        assert_eq!((after[0][3], after[1][3]), (0.0, 3.0));
    }

    /// An int8 initializer of `dims` holding `values`.
    fn int8_tensor(name: &str, dims: &[i64], values: Vec<i32>) -> pb::TensorProto {
        pb::TensorProto {
            name: name.into(),
            data_type: pb::tensor_proto::DataType::Int8 as i32,
            dims: dims.to_vec(),
            int32_data: values,
            ..Default::default()
        }
    }

    /// `x [1, k] -> DynamicQuantizeLinear -> MatMulInteger(w [k, m] int8, w_zp) -> Cast ->
    /// Mul(x_scale * w_scale) -> y [1, m]`, as `quantize_dynamic` writes it; `w_scale` has
    /// one value, or one per column.
    fn dynamic_matmul_graph(k: usize, m: usize, w_scales: &[f32]) -> pb::ModelProto {
        let w: Vec<i32> = (0..k * m).map(|i| ((i * 37 + 11) % 255) as i32 - 127).collect();
        let (w_init, zp_init) = (int8_tensor("w", &[k as i64, m as i64], w), int8_tensor("w_zp", &[], vec![0]));
        let scales = pb::TensorProto {
            name: "w_scale".into(),
            data_type: pb::tensor_proto::DataType::Float as i32,
            dims: if w_scales.len() == 1 { vec![] } else { vec![w_scales.len() as i64] },
            float_data: w_scales.to_vec(),
            ..Default::default()
        };
        let mut b = Builder { prefix: "t", counter: 0, nodes: vec![] };
        b.node("DynamicQuantizeLinear", vec!["x".into()], vec!["xq".into(), "xs".into(), "xzp".into()], vec![]);
        b.node("Mul", vec!["xs".into(), "w_scale".into()], vec!["s".into()], vec![]);
        let mm = vec!["xq".into(), "w".into(), "xzp".into(), "w_zp".into()];
        b.node("MatMulInteger", mm, vec!["acc".into()], vec![]);
        b.node("Cast", vec!["acc".into()], vec!["accf".into()], vec![int_attr("to", 1)]);
        b.node("Mul", vec!["accf".into(), "s".into()], vec!["y".into()], vec![]);
        model_of(pb::GraphProto {
            node: b.nodes,
            initializer: vec![w_init, zp_init, scales],
            input: vec![f32_value("x", &[1, k as i64])],
            output: vec![f32_value("y", &[1, m as i64])],
            ..Default::default()
        })
    }

    fn run_2d(proto: &pb::ModelProto, x: &[f32]) -> Vec<f32> {
        let model = super::super::onnx::framework().model_for_proto_model(proto).unwrap();
        let plan = model.into_optimized().unwrap().into_runnable().unwrap();
        let x = tract_ndarray::Array2::from_shape_vec((1, x.len()), x.to_vec()).unwrap();
        let out = plan.run(tvec!(x.into_tvalue())).unwrap();
        out[0].to_plain_array_view::<f32>().unwrap().iter().copied().collect()
    }

    #[test]
    fn dynamic_products_become_float_products_of_rounded_activations() {
        let (k, m) = (24, 5);
        let x: Vec<f32> = (0..k).map(|i| (i as f32 * 0.61).sin() * 2.0 + 0.3).collect();
        for scales in [vec![0.013f32], vec![0.01, 0.02, 0.005, 0.03, 0.011]] {
            let proto = dynamic_matmul_graph(k, m, &scales);
            let integer = run_2d(&proto, &x);
            let mut rewritten = proto.clone();
            let graph = rewritten.graph.as_mut().unwrap();
            assert_eq!(lower_dynamic_quantization(graph), 1);
            let ops: Vec<&str> = graph.node.iter().map(|n| n.op_type.as_str()).collect();
            assert_eq!(ops, ["EdgeinferDynamicQuantDequant", "DequantizeLinear", "MatMul"], "scales {scales:?}");
            assert_eq!(fold_constant_dequantize(graph), 1);
            let float = run_2d(&rewritten, &x);
            // The same sums, in float instead of integers, times the same scales.
            let top = integer.iter().fold(0f32, |a, v| a.max(v.abs()));
            for (a, b) in float.iter().zip(&integer) {
                assert!((a - b).abs() <= 1e-5 * top, "{float:?} vs {integer:?}");
            }
        }
    }

    /// `x [1, 2, 5, 5] -> DynamicQuantizeLinear -> ConvInteger(w [3, 2, 3, 3] int8, pad 1) ->
    /// Cast -> Mul(x_scale * w_scale) -> Add(Reshape(b, [1, 3, 1, 1])) -> y`, as
    /// `quantize_dynamic` writes a convolution with a bias.
    fn dynamic_conv_graph() -> pb::ModelProto {
        let w: Vec<i32> = (0..54).map(|i| (i * 53 + 7) % 255 - 127).collect();
        let (w_init, zp_init) = (int8_tensor("w", &[3, 2, 3, 3], w), int8_tensor("w_zp", &[], vec![0]));
        let bias = pb::TensorProto {
            name: "b".into(),
            data_type: pb::tensor_proto::DataType::Float as i32,
            dims: vec![3],
            float_data: vec![0.5, -0.25, 0.125],
            ..Default::default()
        };
        let shape = pb::TensorProto {
            name: "b_shape".into(),
            data_type: pb::tensor_proto::DataType::Int64 as i32,
            dims: vec![4],
            int64_data: vec![1, -1, 1, 1],
            ..Default::default()
        };
        let mut b = Builder { prefix: "t", counter: 0, nodes: vec![] };
        b.node("Reshape", vec!["b".into(), "b_shape".into()], vec!["b4".into()], vec![]);
        b.node("DynamicQuantizeLinear", vec!["x".into()], vec!["xq".into(), "xs".into(), "xzp".into()], vec![]);
        b.node("Mul", vec!["xs".into(), "w_scale".into()], vec!["s".into()], vec![]);
        let conv = vec!["xq".into(), "w".into(), "xzp".into(), "w_zp".into()];
        let attrs = vec![pb::AttributeProto {
            name: "pads".into(),
            r#type: AttributeType::Ints as i32,
            ints: vec![1, 1, 1, 1],
            ..Default::default()
        }];
        b.node("ConvInteger", conv, vec!["acc".into()], attrs);
        b.node("Cast", vec!["acc".into()], vec!["accf".into()], vec![int_attr("to", 1)]);
        b.node("Mul", vec!["accf".into(), "s".into()], vec!["scaled".into()], vec![]);
        b.node("Add", vec!["scaled".into(), "b4".into()], vec!["y".into()], vec![]);
        model_of(pb::GraphProto {
            node: b.nodes,
            initializer: vec![w_init, zp_init, f32_scalar("w_scale", 0.011), bias, shape],
            input: vec![f32_value("x", &[1, 2, 5, 5])],
            output: vec![f32_value("y", &[1, 3, 5, 5])],
            ..Default::default()
        })
    }

    #[test]
    fn a_dynamic_convolution_takes_its_bias_in() {
        let x: Vec<f32> = (0..50).map(|i| (i as f32 * 0.37).cos() * 1.5 - 0.2).collect();
        let proto = dynamic_conv_graph();
        let run4 = |proto: &pb::ModelProto| -> Vec<f32> {
            let model = super::super::onnx::framework().model_for_proto_model(proto).unwrap();
            let plan = model.into_optimized().unwrap().into_runnable().unwrap();
            let x = tract_ndarray::Array4::from_shape_vec((1, 2, 5, 5), x.clone()).unwrap();
            let out = plan.run(tvec!(x.into_tvalue())).unwrap();
            out[0].to_plain_array_view::<f32>().unwrap().iter().copied().collect()
        };
        let integer = run4(&proto);
        let mut rewritten = proto.clone();
        let graph = rewritten.graph.as_mut().unwrap();
        assert_eq!(lower_dynamic_quantization(graph), 1);
        let ops: Vec<&str> = graph.node.iter().map(|n| n.op_type.as_str()).collect();
        // The bias Add and its Reshape are gone: the convolution adds the bias.
        assert_eq!(ops, ["EdgeinferDynamicQuantDequant", "DequantizeLinear", "Conv"]);
        assert_eq!(graph.node[2].input[2], "b");
        let float = run4(&rewritten);
        let top = integer.iter().fold(0f32, |a, v| a.max(v.abs()));
        for (a, b) in float.iter().zip(&integer) {
            assert!((a - b).abs() <= 1e-5 * top, "{float:?} vs {integer:?}");
        }
    }

    #[test]
    fn a_dynamic_product_read_elsewhere_is_left_to_the_integer_path() {
        let mut proto = dynamic_matmul_graph(8, 3, &[0.02]);
        let graph = proto.graph.as_mut().unwrap();
        // The integer sums are also a graph output: replacing them would lose it.
        let y = graph.output[0].clone();
        graph.output.push(pb::ValueInfoProto { name: "acc".into(), ..y });
        assert_eq!(lower_dynamic_quantization(graph), 0);
        assert!(graph.node.iter().any(|n| n.op_type == "MatMulInteger"));
    }

    fn run_all(proto: &pb::ModelProto, x: &[f32]) -> Vec<Vec<f32>> {
        let model = super::super::onnx::framework().model_for_proto_model(proto).unwrap();
        let plan = model.into_optimized().unwrap().into_runnable().unwrap();
        let out = plan.run(tvec!(tract_ndarray::arr1(x).into_tvalue())).unwrap();
        out.iter().map(|o| o.to_plain_array_view::<f32>().unwrap().iter().copied().collect()).collect()
    }

    /// `x [4, 8] -> MatMul(W [8, 3]) -> QuantizeLinear -> DequantizeLinear -> y`.
    fn matmul_qdq_graph(scale: f32) -> pb::ModelProto {
        let w = pb::TensorProto {
            name: "w".into(),
            dims: vec![8, 3],
            data_type: pb::tensor_proto::DataType::Float as i32,
            float_data: (0..24).map(|i| ((i * 7 % 11) as f32 - 5.0) * 0.37).collect(),
            ..Default::default()
        };
        let zp = pb::TensorProto {
            name: "zp".into(),
            data_type: pb::tensor_proto::DataType::Int8 as i32,
            int32_data: vec![3],
            ..Default::default()
        };
        let mut b = Builder { prefix: "t", counter: 0, nodes: vec![] };
        b.node("MatMul", vec!["x".into(), "w".into()], vec!["m".into()], vec![]);
        b.q("m", "s", Some("zp"), "q");
        b.node("DequantizeLinear", vec!["q".into(), "s".into(), "zp".into()], vec!["y".into()], vec![]);
        let graph = pb::GraphProto {
            node: b.nodes,
            initializer: vec![w, f32_scalar("s", scale), zp],
            input: vec![f32_value("x", &[4, 8])],
            output: vec![f32_value("y", &[4, 3])],
            ..Default::default()
        };
        model_of(graph)
    }

    #[test]
    fn a_pair_after_a_matmul_runs_in_its_epilogue_with_the_same_values() {
        let scale = 0.05259862f32;
        let x: Vec<f32> = (0..32).map(|i| ((i * 13 % 17) as f32 - 8.0) * 0.61).collect();
        let input = || tvec!(tract_ndarray::Array2::from_shape_vec((4, 8), x.clone()).unwrap().into_tvalue());
        let proto = matmul_qdq_graph(scale);
        let tracts_pair = super::super::onnx::framework().model_for_proto_model(&proto).unwrap();
        let want = tracts_pair.into_optimized().unwrap().into_runnable().unwrap().run(input()).unwrap();

        let mut rewritten = proto.clone();
        assert_eq!(round_qdq_activations(rewritten.graph.as_mut().unwrap()), 1);
        let model = super::super::onnx::framework().model_for_proto_model(&rewritten).unwrap();
        let mut optimized = model.into_optimized().unwrap();
        let has_op = |m: &TypedModel| m.nodes().iter().any(|n| n.op.name() == "EdgeinferQuantDequant");
        assert!(has_op(&optimized), "tract kept the pair as its own node before our fusion");
        assert_eq!(crate::engine::quant_dequant::fuse_into_matmuls(&mut optimized).unwrap(), 1);
        assert!(!has_op(&optimized));
        let got = optimized.into_runnable().unwrap().run(input()).unwrap();
        let (got, want) = (got[0].to_plain_array_view::<f32>().unwrap(), want[0].to_plain_array_view::<f32>().unwrap());
        assert_eq!(got, want);
        // Some values saturate at 127 - 3 steps, so the clip is exercised too.
        assert!(got.iter().any(|&v| v == 124.0 * scale), "{got:?}");
    }

    /// `DequantizeLinear(w) + x -> y`, w an initializer of `w_type` with the given
    /// values, scale and zero point (per axis when longer than one), x: f32 zeros.
    fn dequantize_graph(
        w_type: pb::tensor_proto::DataType,
        dims: &[i64],
        w: &[i32],
        scale: &[f32],
        zp: &[i32],
        axis: i64,
    ) -> pb::ModelProto {
        let dims_of = |v: usize| if v == 1 { vec![] } else { vec![v as i64] };
        let ints = |name: &str, v: &[i32], dims: Vec<i64>| pb::TensorProto {
            name: name.into(),
            dims,
            data_type: w_type as i32,
            int32_data: v.to_vec(),
            ..Default::default()
        };
        let scale_t = pb::TensorProto {
            name: "s".into(),
            dims: dims_of(scale.len()),
            data_type: pb::tensor_proto::DataType::Float as i32,
            float_data: scale.to_vec(),
            ..Default::default()
        };
        let mut b = Builder { prefix: "t", counter: 0, nodes: vec![] };
        b.node(
            "DequantizeLinear",
            vec!["w".into(), "s".into(), "zp".into()],
            vec!["wf".into()],
            vec![int_attr("axis", axis)],
        );
        b.node("Add", vec!["x".into(), "wf".into()], vec!["y".into()], vec![]);
        model_of(pb::GraphProto {
            node: b.nodes,
            initializer: vec![ints("w", w, dims.to_vec()), scale_t, ints("zp", zp, dims_of(zp.len()))],
            input: vec![f32_value("x", dims)],
            output: vec![f32_value("y", dims)],
            ..Default::default()
        })
    }

    #[test]
    fn constant_dequantize_is_computed_as_tract_computes_it() {
        use pb::tensor_proto::DataType;
        let big = [16_777_217, -16_777_219, 2_000_000_003, -7, 0, 123_456_789];
        // Weight type, shape, values, scales, zero points, axis.
        type Case = (DataType, Vec<i64>, Vec<i32>, Vec<f32>, Vec<i32>, i64);
        let cases: Vec<Case> = vec![
            // Per tensor, u8 with a zero point; i8; i32 beyond f32's exact integers.
            (DataType::Uint8, vec![6], vec![0, 1, 127, 128, 200, 255], vec![0.0374], vec![128], 1),
            (DataType::Int8, vec![2, 3], vec![-128, -1, 0, 1, 77, 127], vec![0.05259862], vec![-3], 1),
            (DataType::Int32, vec![6], big.to_vec(), vec![1.3e-5], vec![0], 1),
            // Per axis: output channels first (a conv weight), last (negative axis), an i32 bias.
            (DataType::Int8, vec![3, 2], vec![-128, 5, 0, 127, -9, 33], vec![0.1, 0.013, 7.7e-3], vec![0, 1, -2], 0),
            (DataType::Int8, vec![2, 3], vec![-128, 5, 0, 127, -9, 33], vec![0.1, 0.013, 7.7e-3], vec![0, 0, 0], -1),
            (DataType::Int32, vec![3, 2], big.to_vec(), vec![1e-5, 3.3e-7, 2.0], vec![0, 0, 0], 0),
        ];
        for (w_type, dims, w, scale, zp, axis) in cases {
            let proto = dequantize_graph(w_type, &dims, &w, &scale, &zp, axis);
            let zeros = tract_ndarray::ArrayD::<f32>::zeros(dims.iter().map(|&d| d as usize).collect::<Vec<_>>());
            let eval = |p: &pb::ModelProto| -> Vec<f32> {
                let model = super::super::onnx::framework().model_for_proto_model(p).unwrap();
                let plan = model.into_optimized().unwrap().into_runnable().unwrap();
                let out = plan.run(tvec!(zeros.clone().into_tvalue())).unwrap();
                out[0].to_plain_array_view::<f32>().unwrap().iter().copied().collect()
            };
            let by_tract = eval(&proto);
            let mut folded = proto.clone();
            let graph = folded.graph.as_mut().unwrap();
            assert_eq!(fold_constant_dequantize(graph), 1, "{w_type:?} {dims:?}");
            assert_eq!(graph.node.len(), 1);
            assert!(graph.initializer.iter().all(|t| t.name != "w"), "the integer weights are dropped");
            let by_us = eval(&folded);
            // Listed as a graph input too (old IR versions), the weight may be overridden: left alone.
            let mut overridable = proto.clone();
            let graph = overridable.graph.as_mut().unwrap();
            graph.input.push(pb::ValueInfoProto { name: "w".into(), ..Default::default() });
            assert_eq!(fold_constant_dequantize(graph), 0);
            let bits = |v: &[f32]| v.iter().map(|f| f.to_bits()).collect::<Vec<_>>();
            assert_eq!(bits(&by_us), bits(&by_tract), "{w_type:?} {dims:?} axis {axis}: {by_us:?} vs {by_tract:?}");
        }
    }

    #[test]
    fn folded_pairs_clip_to_the_quantized_range_without_rounding() {
        let (scale, zp) = (0.25f32, 135);
        let x = [0.3f32, -40.0, 40.0, 1.1];
        let mut proto = qdq_graph(x.len(), scale, zp, false);
        assert_eq!(fold_qdq_activations(proto.graph.as_mut().unwrap()), 1);
        // uint8 with zero point 135: the range is [-135, 120] steps, [-33.75, 30] as floats.
        assert_eq!(run(&proto, &x), [0.3, 0.0, 30.0, 1.1]);
    }

    #[test]
    fn a_quantized_graph_output_or_other_consumer_is_left_alone() {
        let mut proto = qdq_graph(4, 0.5, 0, true);
        let graph = proto.graph.as_mut().unwrap();
        let mut b = Builder { prefix: "t", counter: 0, nodes: vec![] };
        b.node("Cast", vec!["q".into()], vec!["q_as_int".into()], vec![]);
        graph.node.extend(b.nodes);
        assert_eq!(round_qdq_activations(graph), 0);
        assert_eq!(graph.node.len(), 4);

        // The quantized tensor is itself a graph output.
        let mut proto = qdq_graph(4, 0.5, 0, true);
        let graph = proto.graph.as_mut().unwrap();
        let y = graph.output[0].clone();
        graph.output.push(pb::ValueInfoProto { name: "q".into(), ..y });
        assert_eq!(round_qdq_activations(graph), 0);
        assert_eq!(fold_qdq_activations(graph), 0);
        assert_eq!(graph.node.len(), 3);
    }
}
