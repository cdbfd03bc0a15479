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

fn attr_i(node: &NodeProto, name: &str) -> Option<i64> {
    node.attribute.iter().find(|a| a.name == name).map(|a| a.i)
}

fn input(node: &NodeProto, ix: usize) -> Option<&str> {
    node.input.get(ix).map(|s| s.as_str()).filter(|s| !s.is_empty())
}

/// Expands every `com.microsoft` QOperator node tract lacks. Fails with a
/// message naming the node when one cannot be expanded faithfully.
pub fn expand_qoperators(graph: &mut pb::GraphProto) -> Result<RewriteReport, String> {
    let mut report = RewriteReport::default();
    let sizes: HashMap<String, usize> =
        graph.initializer.iter().map(|t| (t.name.clone(), t.dims.iter().product::<i64>().max(1) as usize)).collect();
    let old = std::mem::take(&mut graph.node);
    let mut new_nodes = Vec::with_capacity(old.len());
    for node in old {
        if !is_expandable(&node.op_type) || node.domain != "com.microsoft" {
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

/// The float path for QDQ models: replaces each activation's
/// QuantizeLinear -> DequantizeLinear pair by the Clip to the quantized range
/// it implies (the quantizer relies on that saturation for Relu/Relu6), so
/// tract runs float kernels without re-quantizing every activation. Weights
/// keep their int8 values (their DequantizeLinear folds to constants at load);
/// only activation rounding is lost, which the parity tests bound. Returns how
/// many pairs were folded.
pub fn fold_qdq_activations(graph: &mut pb::GraphProto) -> usize {
    use std::collections::HashMap;
    let mut consumers: HashMap<&str, Vec<usize>> = HashMap::new();
    for (ix, n) in graph.node.iter().enumerate() {
        for i in &n.input {
            consumers.entry(i.as_str()).or_default().push(ix);
        }
    }
    let outputs: std::collections::HashSet<&str> = graph.output.iter().map(|o| o.name.as_str()).collect();
    let zp_type = |name: &str| graph.initializer.iter().find(|t| t.name == name).map(|t| t.data_type);
    let mut plans: Vec<(usize, Vec<usize>, f32, f32)> = Vec::new();
    for (qix, q) in graph.node.iter().enumerate() {
        if q.op_type != "QuantizeLinear" || q.input.len() < 2 || q.output.len() != 1 {
            continue;
        }
        let Some(scale) = super::proto::initializer_f32s(graph, &q.input[1]).filter(|s| s.len() == 1).map(|s| s[0])
        else {
            continue;
        };
        let zp_name = q.input.get(2).filter(|s| !s.is_empty());
        let (zp, signed) = match zp_name {
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
        if !same_params || users.is_empty() {
            continue;
        }
        let (qmin, qmax) = if signed { (-128.0, 127.0) } else { (0.0, 255.0) };
        plans.push((qix, users.clone(), (qmin - zp as f32) * scale, (qmax - zp as f32) * scale));
    }
    let mut remove = std::collections::HashSet::new();
    let mut added_nodes = Vec::new();
    let mut added_inits = Vec::new();
    for (qix, users, lo, hi) in &plans {
        let x = graph.node[*qix].input[0].clone();
        let base = graph.node[*qix].output[0].clone();
        let (lo_name, hi_name) = (format!("{base}__clip_lo"), format!("{base}__clip_hi"));
        for (name, v) in [(&lo_name, *lo), (&hi_name, *hi)] {
            added_inits.push(pb::TensorProto {
                name: name.clone(),
                data_type: pb::tensor_proto::DataType::Float as i32,
                float_data: vec![v],
                ..Default::default()
            });
        }
        remove.insert(*qix);
        for &u in users {
            remove.insert(u);
            added_nodes.push((
                u,
                NodeProto {
                    input: vec![x.clone(), lo_name.clone(), hi_name.clone()],
                    output: vec![graph.node[u].output[0].clone()],
                    name: format!("{}__clip", graph.node[u].name),
                    op_type: "Clip".into(),
                    ..Default::default()
                },
            ));
        }
    }
    // Keep topological order: each Clip takes the place of the DequantizeLinear it replaces.
    let replacements: HashMap<usize, NodeProto> = added_nodes.into_iter().collect();
    let old = std::mem::take(&mut graph.node);
    graph.node = old
        .into_iter()
        .enumerate()
        .filter_map(|(ix, n)| match replacements.get(&ix) {
            Some(clip) => Some(clip.clone()),
            None if remove.contains(&ix) => None,
            None => Some(n),
        })
        .collect();
    graph.initializer.extend(added_inits);
    plans.len()
}
