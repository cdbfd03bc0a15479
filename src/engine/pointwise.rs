//! Float 1x1 convolutions of our own, `EdgeinferConv1x1`, on AVX-512, with
//! the bias, a clip and a quantize/dequantize pair in the same pass.
//!
//! tract computes a 1x1 convolution (its `EinSum`) as a matrix product that
//! first packs the activation into panels, output channels across a
//! register's lanes and each pixel's value broadcast. In a channels-first
//! image each input channel's
//! pixels are already contiguous, so this operator reads them in place:
//! blocks of 8 output channels by up to 32 pixels sum in 16 registers, one
//! weight broadcast per output channel and input channel, the weights laid
//! out at load so that a block's weights for one input channel are
//! contiguous. Images of fewer than [`SMALL`] pixels (MobileNet's 7x7
//! layers) put 16 output channels across the lanes instead, each pixel's
//! value broadcast, so that no lane is wasted on a ragged pixel count.
//!
//! Each sum starts from the bias and adds the input channels in order with
//! fused multiply-adds, the same arithmetic as the plain loops the tests
//! compare against; tract's own order differs, so values can differ from
//! its in their last bits.
//!
//! [`use_for_pointwise_convs`] swaps tract's operators, and what follows
//! them, for this one before code generation, on x86-64 CPUs with AVX-512F
//! only (AVX2 x86 and ARM keep tract's kernels); it runs after the int8 pass,
//! which takes the 1x1 convolutions it can compute in integers.

use std::sync::Arc;

use tract_core::internal::{
    DatumType, EvalContext, EvalOp, Op, StaticName, TValue, TVec, TractResult, TypedFact, TypedModel, TypedOp,
};
use tract_core::ops::einsum::EinSum;

use super::epilogue::{eval_into, output_fact, same_bits, swap_in, Epilogue, Folded};
use super::int8_conv::{is_pointwise, Product};

/// The op name tract's plan (and `inspect`'s operator counts) show.
pub const OP_NAME: &str = "EdgeinferConv1x1";

/// Output channels summed together by the wide kernel: one broadcast weight each.
const MR: usize = 8;

/// Fewer pixels than this are summed with the output channels across a
/// register's lanes ([`avx512::run_small`]).
#[cfg(target_arch = "x86_64")]
const SMALL: usize = 64;

/// A 1x1 convolution of stride 1 of one `[K, H, W]` or `[1, K, H, W]` f32
/// tensor into `O` channels: `bias + sum(w * x)`, then the clip and
/// optionally a quantize/dequantize pair.
#[derive(Debug, Clone)]
pub struct Pointwise {
    in_channels: usize,
    out_channels: usize,
    /// Values per channel.
    pixels: usize,
    /// `[K][O + MR]`, zero past `O` so that blocks of `MR` read whole.
    weights: Arc<[f32]>,
    /// One bias per output channel, zero for the `MR` past `O`.
    bias: Arc<[f32]>,
    epi: Epilogue,
    out_shape: TVec<usize>,
}

impl PartialEq for Pointwise {
    fn eq(&self, other: &Self) -> bool {
        self.in_channels == other.in_channels
            && self.out_channels == other.out_channels
            && self.pixels == other.pixels
            && same_bits(&self.weights, &other.weights)
            && same_bits(&self.bias, &other.bias)
            && self.epi == other.epi
            && self.out_shape == other.out_shape
    }
}

// Equality is on bit patterns, an equivalence even for NaN.
impl Eq for Pointwise {}

impl Pointwise {
    /// The operator for `w` (`[O, K]`) applied to `pixels` values per channel.
    fn new(k: usize, o: usize, pixels: usize, w: &[f32], out_shape: TVec<usize>) -> Pointwise {
        let opad = o + MR;
        let mut weights = vec![0f32; k * opad];
        for (oc, row) in w.chunks_exact(k).enumerate() {
            for (ic, &v) in row.iter().enumerate() {
                weights[ic * opad + oc] = v;
            }
        }
        Pointwise {
            in_channels: k,
            out_channels: o,
            pixels,
            weights: weights.into(),
            bias: vec![0.0; opad].into(),
            epi: Epilogue::NONE,
            out_shape,
        }
    }

    /// Sets the bias (`O` values).
    fn with_bias(mut self, bias: &[f32]) -> Pointwise {
        let mut padded = bias.to_vec();
        padded.resize(self.out_channels + MR, 0.0);
        self.bias = padded.into();
        self
    }

    /// Output channels `first..first + out.len() / P` from `x`, as plain loops.
    fn run_plain(&self, x: &[f32], out: &mut [f32], first: usize) {
        let (p, opad) = (self.pixels, self.out_channels + MR);
        for (i, row) in out.chunks_exact_mut(p).enumerate() {
            let o = first + i;
            for (px, y) in row.iter_mut().enumerate() {
                let mut acc = self.bias[o];
                for k in 0..self.in_channels {
                    acc = x[k * p + px].mul_add(self.weights[k * opad + o], acc);
                }
                *y = self.epi.apply(acc);
            }
        }
    }

    fn eval_with(&self, x: &[f32], out: &mut [f32], avx512: bool) -> TractResult<()> {
        let work = out.len() * self.in_channels;
        tract_linalg::multithread::par_chunks_mut(out, self.pixels, work, |first, chunk| {
            #[cfg(target_arch = "x86_64")]
            if avx512 {
                // SAFETY: `avx512` is only set when the CPU has AVX-512F (`cpu_supported`).
                unsafe { avx512::run(self, x, chunk, first) };
                return Ok(());
            }
            let _ = avx512;
            self.run_plain(x, chunk, first);
            Ok(())
        })
    }
}

#[cfg(target_arch = "x86_64")]
mod avx512 {
    //! The AVX-512 block loops.

    use std::arch::x86_64::*;

    use super::super::epilogue::avx512::Regs;
    use super::{Pointwise, MR};

    /// [`Pointwise::run_plain`] with the clip and the pair as constants, so
    /// that a block without them skips their instructions.
    #[target_feature(enable = "avx512f")]
    pub(super) unsafe fn run(op: &Pointwise, x: &[f32], out: &mut [f32], first: usize) {
        match (op.epi.clamps(), op.epi.qdq.is_some()) {
            (false, false) => run_kind::<false, false>(op, x, out, first),
            (false, true) => run_kind::<false, true>(op, x, out, first),
            (true, false) => run_kind::<true, false>(op, x, out, first),
            (true, true) => run_kind::<true, true>(op, x, out, first),
        }
    }

    #[target_feature(enable = "avx512f")]
    unsafe fn run_kind<const CLAMP: bool, const QDQ: bool>(op: &Pointwise, x: &[f32], out: &mut [f32], first: usize) {
        if op.pixels < super::SMALL {
            run_small::<CLAMP, QDQ>(op, x, out, first)
        } else {
            run_wide::<CLAMP, QDQ>(op, x, out, first)
        }
    }

    /// The stores of the first `count` of 16 values.
    #[inline(always)]
    fn mask(count: usize) -> __mmask16 {
        if count >= 16 {
            0xffff
        } else {
            ((1u32 << count) - 1) as u16
        }
    }

    /// Pixels across the lanes: blocks of `MR` output channels by 32 pixels,
    /// then 16 for the last ones.
    #[target_feature(enable = "avx512f")]
    unsafe fn run_wide<const CLAMP: bool, const QDQ: bool>(op: &Pointwise, x: &[f32], out: &mut [f32], first: usize) {
        let p = op.pixels;
        let regs = Regs::new(&op.epi);
        let mut px = 0;
        while px < p {
            if p - px > 16 {
                wide_block::<2, CLAMP, QDQ>(op, x, out, first, px, regs);
                px += 32;
            } else {
                wide_block::<1, CLAMP, QDQ>(op, x, out, first, px, regs);
                px += 16;
            }
        }
    }

    /// Pixels `px..px + 16 * V` (those that exist) of every output channel of `out`.
    #[target_feature(enable = "avx512f")]
    #[inline]
    unsafe fn wide_block<const V: usize, const CLAMP: bool, const QDQ: bool>(
        op: &Pointwise,
        x: &[f32],
        out: &mut [f32],
        first: usize,
        px: usize,
        regs: Regs,
    ) {
        let (p, opad) = (op.pixels, op.out_channels + MR);
        let channels = out.len() / p;
        let masks: [__mmask16; V] = std::array::from_fn(|v| mask(p.saturating_sub(px + 16 * v)));
        let out = out.as_mut_ptr();
        let mut o = 0;
        while o < channels {
            let rows = (channels - o).min(MR);
            let mut acc = [[_mm512_setzero_ps(); V]; MR];
            for (r, acc) in acc.iter_mut().enumerate() {
                *acc = [_mm512_set1_ps(op.bias[first + o + r]); V];
            }
            // Wrapping: a masked load's lanes past the input read nothing.
            let mut xs = x.as_ptr().wrapping_add(px);
            let mut ws = op.weights.as_ptr().add(first + o);
            for _ in 0..op.in_channels {
                let xv: [__m512; V] = std::array::from_fn(|v| _mm512_maskz_loadu_ps(masks[v], xs.wrapping_add(16 * v)));
                for (r, acc) in acc.iter_mut().enumerate() {
                    let w = _mm512_set1_ps(*ws.add(r));
                    for v in 0..V {
                        acc[v] = _mm512_fmadd_ps(xv[v], w, acc[v]);
                    }
                }
                xs = xs.wrapping_add(p);
                ws = ws.add(opad);
            }
            for (r, acc) in acc.iter().enumerate().take(rows) {
                for v in 0..V {
                    let y = regs.apply::<CLAMP, QDQ>(acc[v]);
                    _mm512_mask_storeu_ps(out.add((o + r) * p + px + 16 * v), masks[v], y);
                }
            }
            o += MR;
        }
    }

    /// Output channels across the lanes, for images of fewer than
    /// [`super::SMALL`] pixels: 4 registers of 16 channels by 6 pixels at a
    /// time, each pixel's value broadcast, the results scattered.
    #[target_feature(enable = "avx512f")]
    unsafe fn run_small<const CLAMP: bool, const QDQ: bool>(op: &Pointwise, x: &[f32], out: &mut [f32], first: usize) {
        let channels = out.len() / op.pixels;
        let regs = Regs::new(&op.epi);
        let mut o = 0;
        while o < channels {
            let left = (channels - o).div_ceil(16);
            let mut px = 0;
            while px < op.pixels {
                let n = (op.pixels - px).min(6);
                macro_rules! go {
                    ($cv:literal) => {
                        match n {
                            6 => small_block::<6, $cv, CLAMP, QDQ>(op, x, out, first, o, px, regs),
                            5 => small_block::<5, $cv, CLAMP, QDQ>(op, x, out, first, o, px, regs),
                            4 => small_block::<4, $cv, CLAMP, QDQ>(op, x, out, first, o, px, regs),
                            3 => small_block::<3, $cv, CLAMP, QDQ>(op, x, out, first, o, px, regs),
                            2 => small_block::<2, $cv, CLAMP, QDQ>(op, x, out, first, o, px, regs),
                            _ => small_block::<1, $cv, CLAMP, QDQ>(op, x, out, first, o, px, regs),
                        }
                    };
                }
                match left {
                    1 => go!(1),
                    2 => go!(2),
                    3 => go!(3),
                    _ => go!(4),
                }
                px += n;
            }
            o += 16 * left.min(4);
        }
    }

    /// Output channels `o..o + 16 * CV` (those of `out` that exist) at
    /// pixels `px..px + N`.
    #[target_feature(enable = "avx512f")]
    #[inline]
    #[allow(clippy::too_many_arguments)]
    unsafe fn small_block<const N: usize, const CV: usize, const CLAMP: bool, const QDQ: bool>(
        op: &Pointwise,
        x: &[f32],
        out: &mut [f32],
        first: usize,
        o: usize,
        px: usize,
        regs: Regs,
    ) {
        let (p, opad) = (op.pixels, op.out_channels + MR);
        let channels = out.len() / p;
        let masks: [__mmask16; CV] = std::array::from_fn(|v| mask(channels.saturating_sub(o + 16 * v)));
        // Wrapping: a masked load's lanes past the weights read nothing.
        let ws0 = op.weights.as_ptr().wrapping_add(first + o);
        let mut acc = [[_mm512_setzero_ps(); CV]; N];
        for v in 0..CV {
            let b = _mm512_maskz_loadu_ps(masks[v], op.bias.as_ptr().wrapping_add(first + o + 16 * v));
            for acc in acc.iter_mut() {
                acc[v] = b;
            }
        }
        let mut xs = x.as_ptr().add(px);
        let mut ws = ws0;
        for _ in 0..op.in_channels {
            let w: [__m512; CV] = std::array::from_fn(|v| _mm512_maskz_loadu_ps(masks[v], ws.wrapping_add(16 * v)));
            for (j, acc) in acc.iter_mut().enumerate() {
                let xb = _mm512_set1_ps(*xs.add(j));
                for v in 0..CV {
                    acc[v] = _mm512_fmadd_ps(xb, w[v], acc[v]);
                }
            }
            xs = xs.add(p);
            ws = ws.wrapping_add(opad);
        }
        // Output channel `lane` of a register goes `lane * p` values further.
        let stride = _mm512_mullo_epi32(
            _mm512_set_epi32(15, 14, 13, 12, 11, 10, 9, 8, 7, 6, 5, 4, 3, 2, 1, 0),
            _mm512_set1_epi32(p as i32),
        );
        let out = out.as_mut_ptr();
        for (j, acc) in acc.iter().enumerate() {
            for v in 0..CV {
                if masks[v] != 0 {
                    let y = regs.apply::<CLAMP, QDQ>(acc[v]);
                    _mm512_mask_i32scatter_ps::<4>(out.add((o + 16 * v) * p + px + j), masks[v], stride, y);
                }
            }
        }
    }
}

/// CPUs this operator is put in graphs on: x86-64 with AVX-512F (checked at
/// run time). Elsewhere tract's kernels stay.
pub fn cpu_supported() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        std::arch::is_x86_feature_detected!("avx512f") && std::arch::is_x86_feature_detected!("fma")
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

impl Op for Pointwise {
    fn name(&self) -> StaticName {
        OP_NAME.into()
    }

    fn info(&self) -> TractResult<Vec<String>> {
        let (clip, pair) = self.epi.describe();
        let first = format!("{} -> {} channels, {} pixels, {clip}", self.in_channels, self.out_channels, self.pixels);
        Ok([first].into_iter().chain(pair).collect())
    }

    fn as_typed(&self) -> Option<&dyn TypedOp> {
        Some(self)
    }
}

impl EvalOp for Pointwise {
    fn eval(&self, _ctx: &EvalContext, inputs: TVec<TValue>) -> TractResult<TVec<TValue>> {
        eval_into::<f32, f32>(OP_NAME, &inputs, self.in_channels * self.pixels, &self.out_shape, |x, out| {
            self.eval_with(x, out, cpu_supported())
        })
    }

    fn eval_out_of_plan(&self, inputs: TVec<TValue>) -> TractResult<Option<TVec<TValue>>> {
        Ok(Some(self.eval(&EvalContext::out_of_plan(), inputs)?))
    }
}

impl TypedOp for Pointwise {
    fn as_op(&self) -> &dyn Op {
        self
    }

    fn as_op_mut(&mut self) -> &mut dyn Op {
        self
    }

    fn output_facts(&self, inputs: &[&TypedFact]) -> TractResult<TVec<TypedFact>> {
        output_fact(inputs, DatumType::F32, DatumType::F32, &self.out_shape)
    }
}

/// The operator for the `EinSum` at `node`, if it is an f32 1x1 convolution
/// of one channels-first image ([`is_pointwise`]) with constant weights;
/// with the activation's input slot.
fn for_einsum(model: &TypedModel, node: usize) -> Option<(Pointwise, usize)> {
    let node = model.node(node);
    let p = Product::of(model, node)?;
    if !is_pointwise(p.es, p.xi, p.wi, p.in_shape.len()) {
        return None;
    }
    let (k, pixels) = match *p.in_shape {
        [k, h, w] | [1, k, h, w] => (k, h * w),
        _ => return None,
    };
    let (o, w) = p.weights(model, k, pixels)?;
    // Pixel offsets are 32-bit lanes in the scatter of small images.
    if o * pixels > i32::MAX as usize {
        return None;
    }
    Some((Pointwise::new(k, o, pixels, &w, p.out_shape), p.xi))
}

/// Replaces each f32 1x1 convolution of a decluttered graph (tract's
/// `EinSum`), with the bias, clip and quantize/dequantize pair after it, by
/// [`Pointwise`]; runs after the int8 pass and before tract's code
/// generation. Returns how many convolutions were replaced.
pub fn use_for_pointwise_convs(model: &mut TypedModel) -> TractResult<usize> {
    if !cpu_supported() {
        return Ok(0);
    }
    replace(model)
}

fn replace(model: &mut TypedModel) -> TractResult<usize> {
    let ids: Vec<usize> = model.nodes().iter().filter(|n| n.op_is::<EinSum>()).map(|n| n.id).collect();
    let mut replaced = 0;
    for id in ids {
        let Some((mut op, xi)) = for_einsum(model, id) else { continue };
        let folded = Folded::after(model, id, op.pixels, op.out_channels, false);
        if let Some(bias) = &folded.bias {
            op = op.with_bias(bias);
        }
        op.epi = folded.epi;
        swap_in(model, id, xi, op, folded.end)?;
        replaced += 1;
    }
    if replaced > 0 {
        model.compact()?;
    }
    Ok(replaced)
}

#[cfg(test)]
mod tests {
    use super::*;
    use tract_core::internal::{tensor0, tvec, AxesMapping, DatumType, DatumTypeExt, IntoRunnable, SpecialOps, Tensor};
    use tract_core::ops::binary::TypedBinOp;
    use tract_core::ops::element_wise::ElementWiseOp;
    use tract_core::ops::math::{Add, Max, Min};
    use tract_core::prelude::IntoTValue;

    use super::super::depthwise::tests::values as spread;
    use super::super::quant_dequant::QuantDequant;

    /// One test graph's shape and what follows the sum.
    #[derive(Clone, Copy)]
    struct Case {
        k: usize,
        o: usize,
        hw: [usize; 2],
        batch_axis: bool,
        bias: bool,
        clip: Option<(f32, f32)>,
        qdq: bool,
    }

    fn case(k: usize, o: usize, hw: [usize; 2]) -> Case {
        Case { k, o, hw, batch_axis: true, bias: true, clip: Some((0.0, 6.0)), qdq: false }
    }

    fn cases() -> Vec<Case> {
        vec![
            // Pixels across lanes: whole blocks, a last block of 16, of 1, ragged rows.
            case(16, 8, [8, 8]),
            case(24, 144, [10, 8]),
            case(13, 17, [5, 13]),
            Case { batch_axis: false, bias: false, clip: None, ..case(3, 5, [14, 14]) },
            Case { clip: Some((-0.5, 0.25)), ..case(96, 24, [16, 16]) },
            Case { qdq: true, clip: None, ..case(40, 9, [9, 9]) },
            // Channels across lanes: 7x7, one pixel, ragged pixel and channel counts.
            case(160, 96, [7, 7]),
            case(64, 70, [1, 1]),
            Case { batch_axis: false, ..case(30, 33, [3, 21]) },
            Case { qdq: true, ..case(8, 5, [2, 3]) },
            Case { bias: false, clip: None, ..case(320, 130, [7, 9]) },
        ]
    }

    /// The graph tract's declutter makes of a float 1x1 convolution, with what
    /// `case` says after it; and an input.
    fn graph(case: &Case) -> (TypedModel, Tensor) {
        let Case { k, o, hw: [h, w], batch_axis, .. } = *case;
        let mut shape: TVec<usize> = tvec![k, h, w];
        if batch_axis {
            shape.insert(0, 1);
        }
        let mut model = TypedModel::default();
        let mut wire = model.add_source("x", DatumType::F32.fact(&*shape)).unwrap();
        let weights = model.add_const("w", Tensor::from_shape(&[o, k], &spread(o * k, 5)).unwrap()).unwrap();
        let expr = if batch_axis { "NIHW,OI->NOHW" } else { "IHW,OI->OHW" };
        let sum = EinSum { axes: expr.parse::<AxesMapping>().unwrap(), operating_dt: DatumType::F32, q_params: None };
        wire = model.wire_node("sum", sum, &[wire, weights]).unwrap()[0];
        let rank = shape.len();
        if case.bias {
            let mut b_shape = tvec![o, 1, 1];
            if batch_axis {
                b_shape.insert(0, 1);
            }
            let b = model.add_const("b", Tensor::from_shape(&b_shape, &spread(o, 9)).unwrap()).unwrap();
            wire = model.wire_node("bias", TypedBinOp(Box::new(Add), None), &[wire, b]).unwrap()[0];
        }
        if let Some((lo, hi)) = case.clip {
            let lo = model.add_const("lo", tensor0(lo).broadcast_into_rank(rank).unwrap()).unwrap();
            let hi = model.add_const("hi", tensor0(hi).broadcast_into_rank(rank).unwrap()).unwrap();
            wire = model.wire_node("max", TypedBinOp(Box::new(Max), None), &[wire, lo]).unwrap()[0];
            wire = model.wire_node("min", TypedBinOp(Box::new(Min), None), &[hi, wire]).unwrap()[0];
        }
        if case.qdq {
            let pair = ElementWiseOp(Box::new(QuantDequant::new(0.05, -128.0, 127.0)), None);
            wire = model.wire_node("out_pair", pair, &[wire]).unwrap()[0];
        }
        model.select_output_outlets(&[wire]).unwrap();
        let n: usize = shape.iter().product();
        (model, Tensor::from_shape(&shape, &spread(n, 3)).unwrap())
    }

    fn values(t: &TValue) -> Vec<f32> {
        t.try_as_plain_ram().unwrap().as_slice::<f32>().unwrap().to_vec()
    }

    /// Runs `model` through tract's code generation, after our pass when `ours`.
    fn run(mut model: TypedModel, input: &Tensor, ours: bool) -> (Vec<f32>, Vec<String>) {
        model.declutter().unwrap();
        if ours {
            assert_eq!(replace(&mut model).unwrap(), 1, "the sum is replaced");
        }
        model.optimize().unwrap();
        let ops = model.nodes().iter().map(|n| n.op.name().to_string()).collect();
        let out = model.into_runnable().unwrap().run(tvec!(input.clone().into_tvalue())).unwrap();
        (values(&out[0]), ops)
    }

    /// The operator our pass builds from a graph's only convolution.
    #[cfg(target_arch = "x86_64")]
    fn operator(case: &Case) -> (Pointwise, Tensor) {
        let (mut model, input) = graph(case);
        model.declutter().unwrap();
        replace(&mut model).unwrap();
        let node = model.nodes().iter().find(|n| n.op_is::<Pointwise>()).expect("replaced");
        (node.op_as::<Pointwise>().unwrap().clone(), input)
    }

    #[test]
    fn matches_tracts_sums_with_the_bias_clip_and_pair_folded_in() {
        for c in cases() {
            let label = format!("k {} o {} hw {:?} bias {} clip {:?} qdq {}", c.k, c.o, c.hw, c.bias, c.clip, c.qdq);
            let (model, input) = graph(&c);
            let (want, _) = run(model.clone(), &input, false);
            let (got, ops) = run(model, &input, true);
            // Everything after the sum is folded in: the plan is the source and our op.
            let ours: Vec<&String> = ops.iter().filter(|o| o.as_str() != "Source" && o.as_str() != "Const").collect();
            assert_eq!(ours, [OP_NAME], "{label}: {ops:?}");
            assert_eq!(got.len(), want.len(), "{label}");
            let mut off_by_a_step = 0;
            for (i, (g, w)) in got.iter().zip(&want).enumerate() {
                // Sums of up to 320 products of values under 1: order changes their last bits only.
                let close = (g - w).abs() <= 1e-4 * (1.0 + w.abs());
                // After the pair, a sum at a rounding boundary can land one step away.
                let step = c.qdq && ((g - w).abs() - 0.05).abs() < 1e-4;
                off_by_a_step += step as usize;
                assert!(close || step, "{label}: value {i}: {g} against tract's {w}");
            }
            assert!(off_by_a_step * 100 <= want.len(), "{label}: {off_by_a_step} values a step away");
        }
    }

    #[test]
    #[cfg(target_arch = "x86_64")]
    fn the_avx512_loops_give_the_plain_loops_values_bit_for_bit_from_any_first_channel() {
        if !cpu_supported() {
            eprintln!("skipped: no AVX-512 on this CPU (the operator is not used here)");
            return;
        }
        for c in cases() {
            let (op, input) = operator(&c);
            let x = input.try_as_plain_ram().unwrap().as_slice::<f32>().unwrap().to_vec();
            let p = op.pixels;
            let mut want = vec![0f32; op.out_channels * p];
            op.run_plain(&x, &mut want, 0);
            let mut got = vec![f32::NAN; op.out_channels * p];
            op.eval_with(&x, &mut got, true).unwrap();
            let bits = |v: &[f32]| v.iter().map(|f| f.to_bits()).collect::<Vec<_>>();
            assert_eq!(bits(&got), bits(&want), "k {} o {} hw {:?}", c.k, c.o, c.hw);
            // Threads split the output channels anywhere: runs from 3, then from 3 + 11.
            let (a, b) = (3.min(op.out_channels), (3 + 11).min(op.out_channels));
            let mut split = vec![f32::NAN; op.out_channels * p];
            let (head, tail) = split.split_at_mut(b * p);
            // SAFETY: AVX-512F is checked above.
            unsafe {
                avx512::run(&op, &x, &mut head[..a * p], 0);
                avx512::run(&op, &x, &mut head[a * p..], a);
                avx512::run(&op, &x, tail, b);
            }
            assert_eq!(bits(&split), bits(&want), "split k {} o {} hw {:?}", c.k, c.o, c.hw);
        }
    }

    #[test]
    fn leaves_other_products_to_tract() {
        // Both operands computed, a batch of two, a product that is not a convolution.
        let sum = |expr: &str| EinSum {
            axes: expr.parse::<AxesMapping>().unwrap(),
            operating_dt: DatumType::F32,
            q_params: None,
        };
        let mut model = TypedModel::default();
        let x = model.add_source("x", DatumType::F32.fact([1, 4, 3, 3])).unwrap();
        let w = model.add_source("w", DatumType::F32.fact([5, 4])).unwrap();
        let a = model.wire_node("variable", sum("NIHW,OI->NOHW"), &[x, w]).unwrap()[0];
        let x2 = model.add_source("x2", DatumType::F32.fact([2, 4, 3, 3])).unwrap();
        let k = model.add_const("k", Tensor::from_shape(&[5, 4], &spread(20, 1)).unwrap()).unwrap();
        let b = model.wire_node("batch", sum("NIHW,OI->NOHW"), &[x2, k]).unwrap()[0];
        let m = model.add_source("m", DatumType::F32.fact([6, 4])).unwrap();
        let c = model.wire_node("matmul", sum("MI,OI->MO"), &[m, k]).unwrap()[0];
        model.select_output_outlets(&[a, b, c]).unwrap();
        assert_eq!(replace(&mut model).unwrap(), 0);
    }
}
