//! One activation's QuantizeLinear -> DequantizeLinear pair as a single
//! element-wise operator of our own, `EdgeinferQuantDequant`.
//!
//! Written as plain ONNX float ops (Div, Clip, two additions for the rounding,
//! Mul), a pair is eleven nodes in tract's graph with its constants. That made
//! an int8 MobileNetV2 graph three times the size of its float version, and
//! tract's optimiser, whose patches compare each new node with every node of
//! the graph, spent most of the start-up on them. As one operator it is one
//! node, and one tight loop over the activation at run time.
//!
//! The values are those of the float ops it replaces, bit for bit: multiply by
//! `1 / scale` (as tract does for a division by a constant), clip to the
//! quantized range relative to the zero point, round half to even with
//! [`ROUND_MAGIC`], multiply by `scale`. In NNEF (converted models and the
//! start-up cache) it is
//!
//! ```text
//! edgeinfer_quant_dequant(x: tensor<scalar>, scale: scalar, inv_scale: scalar, lo: scalar, hi: scalar) -> (y: tensor<scalar>)
//! ```
//!
//! tract fuses scalar float ops that follow a matrix product into the
//! kernel's epilogue, where they cost next to nothing, but it does not know
//! this operator; [`fuse_into_matmuls`] does that fusion for it after tract's
//! code generation, so a pair after a convolution or a Gemm runs inside the
//! kernel as six scalar steps, as the float ops did.

use std::any::TypeId;

use tract_core::internal::{tensor0, tvec, Cost, DatumType, SpecialOps, TVec, Tensor, TypedModel, TypedModelPatch};
use tract_core::ops::element_wise::{ElementWiseMiniOp, ElementWiseOp};
use tract_core::ops::matmul::optimized::{OptMatMul, ProtoFusedSpec};
use tract_linalg::BinOp;
use tract_nnef::internal::{
    bail, invocation, Arc, IntoAst, ModelBuilder, OutletId, RValue, Registry, ResolvedInvocation, TractResult,
    TypeName, TypedNode, Value,
};

/// The op type the ONNX rewrite emits and tract's plan shows.
pub const ONNX_OP: &str = "EdgeinferQuantDequant";

/// Its NNEF name, in the `edgeinfer` extension.
const NNEF_OP: &str = "edgeinfer_quant_dequant";

/// `1.5 * 2^23`: adding it to an f32 of magnitude below 2^22 and subtracting it
/// again rounds to the nearest integer, ties to even (ONNX's QuantizeLinear
/// rounding), in two additions that vectorise on every target (a rounding
/// instruction does not exist in baseline x86-64).
pub const ROUND_MAGIC: f32 = 12_582_912.0;

/// Quantize then dequantize one tensor: `clip(round(x * inv_scale), lo, hi) * scale`.
#[derive(Debug, Clone, Copy)]
pub struct QuantDequant {
    /// The quantization step (ONNX's scale).
    pub scale: f32,
    /// `1 / scale`, kept as written so that a round trip through NNEF is exact.
    pub inv_scale: f32,
    /// The lowest quantized value minus the zero point, in steps.
    pub lo: f32,
    /// The highest quantized value minus the zero point, in steps.
    pub hi: f32,
}

impl QuantDequant {
    /// Parameters that are never applied (a placeholder where an op has no pair).
    pub const IDENTITY: QuantDequant = QuantDequant { scale: 1.0, inv_scale: 1.0, lo: -1.0, hi: 1.0 };

    /// The op for a per-tensor `scale` and a range `lo..=hi` in steps from the zero point.
    #[cfg(any(test, feature = "onnx"))]
    pub fn new(scale: f32, lo: f32, hi: f32) -> QuantDequant {
        QuantDequant { scale, inv_scale: 1.0 / scale, lo, hi }
    }

    /// The computation, in place; written so that it vectorises.
    fn apply(&self, xs: &mut [f32]) {
        // By value, so the loop keeps the parameters in registers.
        let qd = *self;
        for v in xs {
            *v = qd.one(*v);
        }
    }

    /// The computation for one value; inlined into the loops that use it
    /// (here and in the depthwise convolution's epilogue) so they vectorise.
    #[inline(always)]
    pub fn one(&self, v: f32) -> f32 {
        let q = v * self.inv_scale;
        let q = if q < self.lo { self.lo } else { q };
        let q = if q > self.hi { self.hi } else { q };
        ((q + ROUND_MAGIC) - ROUND_MAGIC) * self.scale
    }

    /// Parameters the computation is exact for: a positive finite step, and a
    /// range within 2^22 steps, where the `ROUND_MAGIC` rounding holds.
    fn valid(&self) -> bool {
        const LIMIT: f32 = 4_194_304.0;
        self.scale.is_finite()
            && self.scale > 0.0
            && self.inv_scale.is_finite()
            && -LIMIT <= self.lo
            && self.lo <= self.hi
            && self.hi <= LIMIT
    }

    /// The parameters of `node`, if it is this operator (with no output type change).
    pub fn of(node: &TypedNode) -> Option<QuantDequant> {
        node.op_as::<ElementWiseOp>()
            .filter(|ew| ew.1.is_none())
            .and_then(|ew| ew.0.downcast_ref::<QuantDequant>())
            .copied()
    }

    fn bits(&self) -> [u32; 4] {
        [self.scale.to_bits(), self.inv_scale.to_bits(), self.lo.to_bits(), self.hi.to_bits()]
    }
}

impl PartialEq for QuantDequant {
    fn eq(&self, other: &Self) -> bool {
        self.bits() == other.bits()
    }
}

// Equality is on the bit patterns, which is an equivalence even for NaN.
impl Eq for QuantDequant {}

impl ElementWiseMiniOp for QuantDequant {
    fn name(&self) -> String {
        ONNX_OP.into()
    }

    fn eval_in_place(&self, t: &mut Tensor, _out_dt: Option<DatumType>) -> TractResult<()> {
        if t.datum_type() != DatumType::F32 {
            bail!("{ONNX_OP}: the activation is {:?}; only f32 activations are supported", t.datum_type());
        }
        let mut plain = t.try_as_plain_ram_mut()?;
        self.apply(plain.as_slice_mut::<f32>()?);
        Ok(())
    }

    fn cost_per_element(&self, dt: DatumType) -> TVec<(Cost, usize)> {
        tvec!((Cost::FMA(dt), 3))
    }

    fn info(&self) -> TractResult<Vec<String>> {
        Ok(vec![format!("scale {} range [{}, {}] steps", self.scale, self.lo, self.hi)])
    }
}

/// Moves each quantize-dequantize that is the only consumer of one of tract's
/// optimised matrix products into that product's epilogue, as the scalar
/// steps `* inv_scale`, `max lo`, `min hi`, `+ ROUND_MAGIC`, `- ROUND_MAGIC`,
/// `* scale`: the same arithmetic in the same order, so the values do not
/// change. Runs on an optimised (code-generated) graph; returns how many
/// were fused.
pub fn fuse_into_matmuls(model: &mut TypedModel) -> TractResult<usize> {
    let outputs = model.output_outlets()?.to_vec();
    let mut found = Vec::new();
    for node in model.nodes() {
        let Some(mm) = node.op_as::<OptMatMul>() else { continue };
        if node.outputs.len() != 1 || node.outputs[0].successors.len() != 1 || outputs.contains(&node.id.into()) {
            continue;
        }
        let succ = model.node(node.outputs[0].successors[0].node);
        let Some(qd) = QuantDequant::of(succ) else { continue };
        let fact = &succ.outputs[0].fact;
        let f32_kernels = mm.mmm.iter().all(|k| k.internal_type() == DatumType::F32);
        let stores_last = matches!(mm.micro_ops.last(), Some(ProtoFusedSpec::Store(_)));
        if f32_kernels && stores_last && fact.datum_type == DatumType::F32 && fact.shape == mm.c_fact.shape {
            found.push((node.id, succ.id, qd));
        }
    }
    for (mm_id, succ_id, qd) in &found {
        let node = model.node(*mm_id);
        let succ = model.node(*succ_id);
        let mut op = node.op_as::<OptMatMul>().expect("checked above").clone();
        let mut patch = TypedModelPatch::new(format!("fusing {} into {}", succ.name, node.name));
        let mut inputs = patch.taps(model, &node.inputs)?;
        let steps = [
            (qd.inv_scale, BinOp::Mul),
            (qd.lo, BinOp::Max),
            (qd.hi, BinOp::Min),
            (ROUND_MAGIC, BinOp::Add),
            // In a fused epilogue `Sub` is `scalar - c`; `SubF` is `c - scalar`.
            (ROUND_MAGIC, BinOp::SubF),
            (qd.scale, BinOp::Mul),
        ];
        let mut specs = Vec::new();
        for (i, (value, binop)) in steps.into_iter().enumerate() {
            specs.push(ProtoFusedSpec::BinScalar(inputs.len(), binop));
            inputs.push(patch.add_const(format!("{}.step{i}", succ.name), tensor0(value))?);
        }
        let store = op.micro_ops.len() - 1;
        op.micro_ops.splice(store..store, specs);
        op.c_fact = succ.outputs[0].fact.clone();
        let wired = patch.wire_node(&succ.name, op, &inputs)?;
        patch.shunt_outside(model, (*succ_id).into(), wired[0])?;
        patch.apply(model)?;
    }
    if !found.is_empty() {
        model.compact()?;
    }
    Ok(found.len())
}

/// Adds the NNEF form to the `edgeinfer` registry.
pub fn register_nnef(reg: &mut Registry) {
    reg.register_element_wise(
        NNEF_OP,
        TypeId::of::<QuantDequant>(),
        Box::new(dump),
        vec![
            TypeName::Scalar.tensor().named("x"),
            TypeName::Scalar.named("scale"),
            TypeName::Scalar.named("inv_scale"),
            TypeName::Scalar.named("lo"),
            TypeName::Scalar.named("hi"),
        ],
        load,
    );
}

fn dump(ast: &mut IntoAst, node: &TypedNode) -> TractResult<Option<Arc<RValue>>> {
    let Some(ew) = node.op_as::<ElementWiseOp>() else { return Ok(None) };
    let Some(op) = ew.0.downcast_ref::<QuantDequant>() else { return Ok(None) };
    if ew.1.is_some() {
        return Ok(None);
    }
    let x = ast.mapping[&node.inputs[0]].clone();
    let args = [
        ("scale", RValue::Literal(op.scale.into())),
        ("inv_scale", RValue::Literal(op.inv_scale.into())),
        ("lo", RValue::Literal(op.lo.into())),
        ("hi", RValue::Literal(op.hi.into())),
    ];
    Ok(Some(invocation(NNEF_OP, &[x], &args)))
}

fn load(builder: &mut ModelBuilder, inv: &ResolvedInvocation) -> TractResult<Value> {
    let x: OutletId = inv.named_arg_as(builder, "x")?;
    let op = QuantDequant {
        scale: inv.named_arg_as(builder, "scale")?,
        inv_scale: inv.named_arg_as(builder, "inv_scale")?,
        lo: inv.named_arg_as(builder, "lo")?,
        hi: inv.named_arg_as(builder, "hi")?,
    };
    let dt = builder.model.outlet_fact(x)?.datum_type;
    if dt != DatumType::F32 {
        bail!("{NNEF_OP} on a {dt:?} input; it takes f32");
    }
    if !op.valid() {
        bail!("{NNEF_OP}: bad parameters {op:?}");
    }
    builder.wire(ElementWiseOp(Box::new(op), None), &[x])
}

/// Registers the ONNX op type with tract-onnx, for the nodes the QDQ rewrite emits
/// (float attributes `scale`, `lo`, `hi`).
#[cfg(feature = "onnx")]
pub fn register_onnx(onnx: &mut tract_onnx::Onnx) {
    use tract_onnx::tract_hir::ops::element_wise::ElementWiseIntoHir;
    onnx.op_register.insert(ONNX_OP, |_ctx, node| {
        let scale: f32 = node.get_attr("scale")?;
        let lo: f32 = node.get_attr("lo")?;
        let hi: f32 = node.get_attr("hi")?;
        let op = QuantDequant::new(scale, lo, hi);
        if !op.valid() {
            bail!("{ONNX_OP} {}: bad attributes scale {scale}, lo {lo}, hi {hi}", node.name);
        }
        Ok((ElementWiseOp(Box::new(op), None).into_hir(), vec![]))
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    /// ONNX's QuantizeLinear then DequantizeLinear, computed the slow and obvious way.
    fn reference(x: f32, scale: f32, lo: f32, hi: f32) -> f32 {
        (x * (1.0 / scale)).round_ties_even().clamp(lo, hi) * scale
    }

    #[test]
    fn rounds_half_to_even_and_saturates() {
        let op = QuantDequant::new(0.5, -128.0, 127.0);
        // 0.25 / 0.5 = 0.5 -> 0; 0.75 / 0.5 = 1.5 -> 2; far out of range saturates.
        let mut xs = vec![0.25, 0.75, -0.25, -0.75, 1000.0, -1000.0, 0.0, 3.1];
        op.apply(&mut xs);
        assert_eq!(xs, vec![0.0, 1.0, -0.0, -1.0, 63.5, -64.0, 0.0, 3.0]);
    }

    #[test]
    fn matches_the_reference_over_a_sweep() {
        for &(scale, lo, hi) in
            &[(0.023529412f32, 0.0f32, 255.0f32), (0.08168936, -117.0, 138.0), (1e-3, -128.0, 127.0)]
        {
            let op = QuantDequant::new(scale, lo, hi);
            let mut xs: Vec<f32> = (-4000..4000).map(|i| i as f32 * scale * 0.0731).collect();
            let want: Vec<f32> = xs.iter().map(|&x| reference(x, scale, lo, hi)).collect();
            op.apply(&mut xs);
            assert_eq!(xs, want, "scale {scale}");
        }
    }

    #[test]
    fn parameters_outside_the_exact_range_are_refused() {
        assert!(QuantDequant::new(0.1, -128.0, 127.0).valid());
        assert!(!QuantDequant::new(0.0, -128.0, 127.0).valid());
        assert!(!QuantDequant::new(f32::NAN, -128.0, 127.0).valid());
        assert!(!QuantDequant::new(0.1, 5.0, 4.0).valid());
        assert!(!QuantDequant::new(0.1, 0.0, 1e7).valid());
    }

    #[test]
    fn equality_is_on_the_parameters() {
        assert_eq!(QuantDequant::new(0.1, 0.0, 255.0), QuantDequant::new(0.1, 0.0, 255.0));
        assert_ne!(QuantDequant::new(0.1, 0.0, 255.0), QuantDequant::new(0.1, -1.0, 255.0));
    }
}
