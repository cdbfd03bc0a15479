//! Dynamic quantization (`onnxruntime.quantization.quantize_dynamic`) on
//! float kernels: one activation's DynamicQuantizeLinear, read back as
//! floats, as a single operator of our own, `EdgeinferDynamicQuantDequant`.
//!
//! A dynamically quantized model computes each convolution and matrix
//! product as `DynamicQuantizeLinear -> ConvInteger -> Cast -> Mul(x_scale *
//! w_scale)`. tract runs ConvInteger and MatMulInteger on generic integer
//! loops, 25 to 30 times slower than the float model. The chain equals a
//! float convolution of the activation rounded onto the grid
//! DynamicQuantizeLinear picks for it, with the weights dequantized:
//! `x_scale * w_scale * sum((x_q - x_zp)(w_q - w_zp)) = sum(x_r * w_f)`. The
//! ONNX rewrite (`rewrite::lower_dynamic_quantization`) emits this operator
//! and a float Conv or MatMul, which tract's float kernels run; the values
//! differ from the integer sums only in float rounding.
//!
//! Per inference the operator finds the tensor's range (widened to hold 0),
//! takes `scale = (max - min) / 255` and the zero point `round(-min /
//! scale)` as DynamicQuantizeLinear does, and writes `(clip(round(x /
//! scale) + zp, 0, 255) - zp) * scale`: what DequantizeLinear would read
//! back. `x / scale` is computed as `x * (1 / scale)`, as tract computes a
//! static pair and as our integer convolution packs a dynamic input, so
//! that the float and the integer paths round every value alike (a value
//! within an ulp of a rounding tie may round the other way than ONNX
//! Runtime's division). In NNEF (converted models, the start-up cache) it is
//!
//! ```text
//! edgeinfer_dynamic_quant_dequant(x: tensor<scalar>) -> (y: tensor<scalar>)
//! ```

use tract_core::internal::{
    tvec, AxesMapping, AxisChangeConsequence, AxisOp, DatumType, DatumTypeExt, EvalContext, EvalOp, InOut, IntoTValue,
    Op, StaticName, TValue, TVec, Tensor, TypedFact, TypedModel, TypedNode, TypedOp,
};
use tract_nnef::internal::{
    bail, invocation, Arc, IntoAst, ModelBuilder, OutletId, RValue, Registry, ResolvedInvocation, TractResult,
    TypeName, Value,
};

use super::quant_dequant::ROUND_MAGIC;

/// The op type the ONNX rewrite emits and tract's plan shows.
pub const ONNX_OP: &str = "EdgeinferDynamicQuantDequant";

/// Its NNEF name, in the `edgeinfer` extension.
const NNEF_OP: &str = "edgeinfer_dynamic_quant_dequant";

/// The u8 grid DynamicQuantizeLinear picks for a tensor.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Grid {
    /// The step (ONNX's `y_scale`).
    pub scale: f32,
    /// The zero point (ONNX's `y_zero_point`), 0..=255.
    pub zero_point: u8,
}

impl Grid {
    /// The grid for `xs`, or `None` when every value is zero (or NaN): the
    /// range is then empty and the values pass unchanged.
    pub fn of(xs: &[f32]) -> Option<Grid> {
        let (min, max) = range(xs);
        let scale = (max - min) / 255.0;
        if !(scale > 0.0 && scale.is_finite()) {
            return None;
        }
        let zero_point = (-min / scale).round_ties_even().clamp(0.0, 255.0) as u8;
        Some(Grid { scale, zero_point })
    }

    /// Every value rounded onto the grid, in place.
    #[cfg(test)]
    pub fn apply(&self, xs: &mut [f32]) {
        let copy = xs.to_vec();
        self.apply_into(&copy, xs);
    }

    /// Every value of `xs` rounded onto the grid, into `out` (as long);
    /// written so that it vectorises.
    pub fn apply_into(&self, xs: &[f32], out: &mut [f32]) {
        assert_eq!(xs.len(), out.len(), "{ONNX_OP}: output of another length");
        // A pass over every activation: AVX does eight values at a time where
        // baseline x86-64 (SSE2) does four.
        #[cfg(target_arch = "x86_64")]
        if std::arch::is_x86_feature_detected!("avx") {
            // SAFETY: the CPU has AVX (checked just above).
            return unsafe { self.apply_avx(xs, out) };
        }
        self.apply_plain(xs, out)
    }

    /// [`Self::apply_into`] compiled for AVX.
    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx")]
    unsafe fn apply_avx(&self, xs: &[f32], out: &mut [f32]) {
        self.apply_plain(xs, out)
    }

    /// The loop of [`Self::apply_into`], inlined into each target's copy.
    #[inline(always)]
    fn apply_plain(&self, xs: &[f32], out: &mut [f32]) {
        // `clip(round(x / s) + zp, 0, 255) - zp` is `clip(round(x / s), -zp,
        // 255 - zp)`: the zero point is a whole number. `|x / s| <= 255`, so
        // the magic-number rounding is exact.
        let (scale, lo, hi) = (self.scale, -(self.zero_point as f32), 255.0 - self.zero_point as f32);
        let inv_scale = 1.0 / scale;
        for (o, &v) in out.iter_mut().zip(xs) {
            let q = v * inv_scale;
            let q = if q < lo { lo } else { q };
            let q = if q > hi { hi } else { q };
            *o = ((q + ROUND_MAGIC) - ROUND_MAGIC) * scale;
        }
    }
}

/// The smallest and largest of `xs`, widened to include 0 (NaNs are
/// skipped): the portable reference, and a vector loop per target (the
/// compiler turns the reference's compare-and-select into lane shuffles).
fn range(xs: &[f32]) -> (f32, f32) {
    #[cfg(target_arch = "x86_64")]
    return sse::range(xs);
    #[cfg(target_arch = "aarch64")]
    return neon::range(xs);
    #[allow(unreachable_code)]
    range_plain(xs)
}

/// [`range`] one value at a time.
fn range_plain(xs: &[f32]) -> (f32, f32) {
    xs.iter().fold((0f32, 0f32), |(lo, hi), &v| (if v < lo { v } else { lo }, if v > hi { v } else { hi }))
}

#[cfg(target_arch = "x86_64")]
mod sse {
    use std::arch::x86_64::{_mm_loadu_ps, _mm_max_ps, _mm_min_ps, _mm_setzero_ps, _mm_storeu_ps};

    /// [`super::range`] with SSE, which every x86-64 CPU has: 16 values a step.
    pub fn range(xs: &[f32]) -> (f32, f32) {
        let mut chunks = xs.chunks_exact(16);
        // SAFETY: SSE is baseline on x86-64; every load reads 4 of the 16
        // values of a whole chunk.
        let (lo, hi) = unsafe {
            let (mut lo, mut hi) = ([_mm_setzero_ps(); 4], [_mm_setzero_ps(); 4]);
            for c in &mut chunks {
                for k in 0..4 {
                    let v = _mm_loadu_ps(c.as_ptr().add(4 * k));
                    // `minps a, b` gives `b` when either is NaN: the running bound.
                    lo[k] = _mm_min_ps(v, lo[k]);
                    hi[k] = _mm_max_ps(v, hi[k]);
                }
            }
            let (mut l, mut h) = ([0f32; 4], [0f32; 4]);
            _mm_storeu_ps(l.as_mut_ptr(), _mm_min_ps(_mm_min_ps(lo[0], lo[1]), _mm_min_ps(lo[2], lo[3])));
            _mm_storeu_ps(h.as_mut_ptr(), _mm_max_ps(_mm_max_ps(hi[0], hi[1]), _mm_max_ps(hi[2], hi[3])));
            (l, h)
        };
        let (tl, th) = super::range_plain(chunks.remainder());
        let lo = lo.iter().fold(tl, |a, &b| a.min(b));
        let hi = hi.iter().fold(th, |a, &b| a.max(b));
        (lo, hi)
    }
}

#[cfg(target_arch = "aarch64")]
mod neon {
    use std::arch::aarch64::{vdupq_n_f32, vld1q_f32, vmaxnmq_f32, vmaxnmvq_f32, vminnmq_f32, vminnmvq_f32};

    /// [`super::range`] with NEON, which every aarch64 CPU has: 16 values a step.
    pub fn range(xs: &[f32]) -> (f32, f32) {
        let mut chunks = xs.chunks_exact(16);
        // SAFETY: NEON is baseline on aarch64; every load reads 4 of the 16
        // values of a whole chunk.
        let (lo, hi) = unsafe {
            let (mut lo, mut hi) = ([vdupq_n_f32(0.0); 4], [vdupq_n_f32(0.0); 4]);
            for c in &mut chunks {
                for k in 0..4 {
                    let v = vld1q_f32(c.as_ptr().add(4 * k));
                    // `fminnm`/`fmaxnm` give the number when one side is NaN
                    // (`fmin`/`fmax` would make the lane NaN for good).
                    lo[k] = vminnmq_f32(v, lo[k]);
                    hi[k] = vmaxnmq_f32(v, hi[k]);
                }
            }
            let lo = vminnmq_f32(vminnmq_f32(lo[0], lo[1]), vminnmq_f32(lo[2], lo[3]));
            let hi = vmaxnmq_f32(vmaxnmq_f32(hi[0], hi[1]), vmaxnmq_f32(hi[2], hi[3]));
            (vminnmvq_f32(lo), vmaxnmvq_f32(hi))
        };
        let (tl, th) = super::range_plain(chunks.remainder());
        (lo.min(tl), hi.max(th))
    }
}

/// DynamicQuantizeLinear then DequantizeLinear of one f32 tensor.
#[derive(Debug, Clone, Default, PartialEq, Eq, Hash)]
pub struct DynQuantDequant;

impl Op for DynQuantDequant {
    fn name(&self) -> StaticName {
        ONNX_OP.into()
    }

    fn info(&self) -> TractResult<Vec<String>> {
        Ok(vec!["u8 grid from the tensor's range, per inference".into()])
    }

    fn as_typed(&self) -> Option<&dyn TypedOp> {
        Some(self)
    }
}

impl EvalOp for DynQuantDequant {
    fn eval(&self, _ctx: &EvalContext, mut inputs: TVec<TValue>) -> TractResult<TVec<TValue>> {
        let x = inputs.remove(0);
        if x.datum_type() != DatumType::F32 {
            bail!("{ONNX_OP}: the activation is {:?}; only f32 activations are supported", x.datum_type());
        }
        let out = {
            let view = x.try_as_plain_ram()?;
            let xs = view.as_slice::<f32>()?;
            let Some(grid) = Grid::of(xs) else { return Ok(tvec!(x.clone())) };
            // Into a new tensor: the input is often shared (a residual branch
            // reads it too), and a copy then an in-place pass costs twice the traffic.
            // SAFETY: `apply_into` writes every value.
            let mut out = unsafe { Tensor::uninitialized::<f32>(x.shape())? };
            {
                let mut plain = out.try_as_plain_ram_mut()?;
                grid.apply_into(xs, plain.as_slice_mut::<f32>()?);
            }
            out
        };
        Ok(tvec!(out.into_tvalue()))
    }

    fn eval_out_of_plan(&self, inputs: TVec<TValue>) -> TractResult<Option<TVec<TValue>>> {
        Ok(Some(self.eval(&EvalContext::out_of_plan(), inputs)?))
    }
}

impl TypedOp for DynQuantDequant {
    fn as_op(&self) -> &dyn Op {
        self
    }

    fn as_op_mut(&mut self) -> &mut dyn Op {
        self
    }

    fn output_facts(&self, inputs: &[&TypedFact]) -> TractResult<TVec<TypedFact>> {
        tract_core::internal::ensure!(inputs.len() == 1 && inputs[0].datum_type == DatumType::F32);
        Ok(tvec!(DatumType::F32.fact(inputs[0].shape.clone())))
    }

    fn axes_mapping(&self, inputs: &[&TypedFact], outputs: &[&TypedFact]) -> TractResult<AxesMapping> {
        AxesMapping::natural(inputs, outputs)
    }

    // The grid depends on the values, not on where they sit: any axis change
    // passes through.
    fn change_axes(
        &self,
        model: &TypedModel,
        node: &TypedNode,
        _io: InOut,
        change: &AxisOp,
    ) -> TractResult<Option<AxisChangeConsequence>> {
        Ok(Some(AxisChangeConsequence::new(model, node, None, change)))
    }
}

/// Adds the NNEF form to the `edgeinfer` registry.
pub fn register_nnef(reg: &mut Registry) {
    reg.register_dumper(dump);
    reg.register_primitive(NNEF_OP, &[TypeName::Scalar.tensor().named("x")], &[("y", TypeName::Scalar.tensor())], load);
}

fn dump(ast: &mut IntoAst, node: &TypedNode, _op: &DynQuantDequant) -> TractResult<Option<Arc<RValue>>> {
    let x = ast.mapping[&node.inputs[0]].clone();
    Ok(Some(invocation(NNEF_OP, &[x], &[])))
}

fn load(builder: &mut ModelBuilder, inv: &ResolvedInvocation) -> TractResult<Value> {
    let x: OutletId = inv.named_arg_as(builder, "x")?;
    let dt = builder.model.outlet_fact(x)?.datum_type;
    if dt != DatumType::F32 {
        bail!("{NNEF_OP} on a {dt:?} input; it takes f32");
    }
    builder.wire(DynQuantDequant, &[x])
}

/// Registers the ONNX op type with tract-onnx, for the nodes the dynamic
/// quantization rewrite emits (no attributes).
#[cfg(feature = "onnx")]
pub fn register_onnx(onnx: &mut tract_onnx::Onnx) {
    onnx.op_register.insert(ONNX_OP, |_ctx, _node| Ok((tract_onnx::tract_hir::ops::expandable::expand(Rules), vec![])));
}

/// The inference-time rules and wiring of [`DynQuantDequant`] for tract-onnx.
#[cfg(feature = "onnx")]
#[derive(Debug, Clone, Hash)]
struct Rules;

#[cfg(feature = "onnx")]
mod hir {
    use tract_onnx::tract_hir::internal::*;

    impl Expansion for super::Rules {
        fn name(&self) -> StaticName {
            super::ONNX_OP.into()
        }

        fn rules<'r, 'p: 'r, 's: 'r>(
            &'s self,
            s: &mut Solver<'r>,
            inputs: &'p [TensorProxy],
            outputs: &'p [TensorProxy],
        ) -> TractResult<()> {
            check_input_arity(inputs, 1)?;
            check_output_arity(outputs, 1)?;
            s.equals(&inputs[0].datum_type, f32::datum_type())?;
            s.equals(&outputs[0].datum_type, f32::datum_type())?;
            s.equals(&inputs[0].shape, &outputs[0].shape)?;
            Ok(())
        }

        fn wire(&self, prefix: &str, model: &mut TypedModel, inputs: &[OutletId]) -> TractResult<TVec<OutletId>> {
            model.wire_node(prefix, super::DynQuantDequant, inputs)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// DynamicQuantizeLinear then DequantizeLinear as the ONNX reference
    /// implementation writes them, with `x * (1 / scale)` for `x / scale`.
    fn reference(xs: &[f32]) -> Vec<f32> {
        let min = xs.iter().fold(0f32, |a, &b| a.min(b));
        let max = xs.iter().fold(0f32, |a, &b| a.max(b));
        let scale = (max - min) / 255.0;
        let zp = (-min / scale).round_ties_even().clamp(0.0, 255.0);
        xs.iter().map(|&x| (((x * (1.0 / scale)).round_ties_even() + zp).clamp(0.0, 255.0) - zp) * scale).collect()
    }

    #[test]
    fn matches_the_onnx_definition() {
        let cases: Vec<Vec<f32>> = vec![
            (0..1000).map(|i| (i as f32 * 0.37).sin() * 3.0 - 0.5).collect(),
            (0..37).map(|i| i as f32 * 0.25).collect(),
            (0..19).map(|i| -(i as f32) * 1.5).collect(),
            vec![0.5, -0.25, 1e-3, 7.0, -7.0, 0.0, 3.5],
        ];
        for xs in cases {
            let grid = Grid::of(&xs).expect("a range");
            let mut got = xs.clone();
            grid.apply(&mut got);
            assert_eq!(got, reference(&xs), "input {:?}", &xs[..xs.len().min(8)]);
        }
    }

    #[test]
    fn the_range_always_holds_zero_and_ties_round_to_even() {
        // All positive: min widens to 0, so the zero point is 0 and 0 stays exact.
        let grid = Grid::of(&[1.0, 2.55]).unwrap();
        assert_eq!(grid.zero_point, 0);
        assert!((grid.scale - 0.01).abs() < 1e-7);
        // All negative: the zero point is 255.
        assert_eq!(Grid::of(&[-2.0, -1.0]).unwrap().zero_point, 255);
        // 2.5 steps rounds to 2, 3.5 to 4.
        let grid = Grid { scale: 1.0, zero_point: 0 };
        let mut xs = vec![2.5, 3.5, 300.0, -4.0];
        grid.apply(&mut xs);
        assert_eq!(xs, vec![2.0, 4.0, 255.0, 0.0]);
    }

    #[test]
    fn all_zero_and_nan_inputs_pass_unchanged() {
        assert_eq!(Grid::of(&[0.0; 9]), None);
        assert_eq!(Grid::of(&[]), None);
        assert_eq!(Grid::of(&[f32::NAN, 0.0]), None);
        // NaN is skipped by the range and stays NaN.
        let grid = Grid::of(&[f32::NAN, 1.0, -1.0]).unwrap();
        let mut xs = vec![f32::NAN, 1.0];
        grid.apply(&mut xs);
        assert!(xs[0].is_nan());
    }

    #[test]
    fn the_vector_range_matches_the_reference() {
        for n in [0usize, 5, 16, 33, 1000] {
            let xs: Vec<f32> = (0..n).map(|i| ((i * 7919) % 1013) as f32 * 0.01 - 4.0).collect();
            assert_eq!(range(&xs), range_plain(&xs), "n {n}");
            let mut with_nan = xs.clone();
            if n > 3 {
                with_nan[3] = f32::NAN;
                assert_eq!(range(&with_nan), range_plain(&with_nan), "n {n} with a NaN");
            }
        }
    }

    #[test]
    fn the_range_sees_every_lane_and_the_tail() {
        for n in [1usize, 7, 8, 9, 16, 23] {
            for at in 0..n {
                let mut xs = vec![0.5f32; n];
                xs[at] = -9.0;
                let max = if n > 1 { 0.5 } else { 0.0 };
                assert_eq!(range(&xs), (-9.0, max), "n {n} at {at}");
            }
        }
    }
}
