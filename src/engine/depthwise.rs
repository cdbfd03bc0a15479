//! A 3x3 or 5x5 depthwise convolution of our own, `EdgeinferDepthwise`, for the
//! channels-first, batch-of-one form MobileNet-style networks export to ONNX,
//! with the element-wise operations that follow it (a ReLU6 clip, an int8
//! activation's quantize/dequantize pair) run in the same loop.
//!
//! Profiling float MobileNetV2 put about 30% of its time in tract's depthwise
//! convolution: a zone walk with a generic border path, and no epilogue, so
//! the clip and the quantize/dequantize pair that follow each depthwise
//! convolution were one or two more passes over the activation. Here each
//! channel is copied once into a zero-padded plane (split into even and odd
//! columns for a stride of 2), after which every output row is nine
//! contiguous multiply-adds per value with no border cases, written so that
//! the compiler vectorises it for AVX2 and FMA, and the clip and the pair
//! are applied before the value is stored.
//!
//! [`use_for_depthwise_convs`] swaps tract's `Conv` for this operator in a
//! decluttered graph, before tract's code generation, on x86-64 with AVX2
//! and FMA, on aarch64 for int8 models, and on 32-bit ARM for those of a
//! QDQ model ([`cpu_supported`] says why not elsewhere). The sums are in
//! a different order than tract's, so a value can differ from tract's in its
//! last bits; the epilogue's arithmetic is that of the operators it
//! replaces, bit for bit. On ARM, where it reads an int8 operator's
//! indices and its weights are int8 steps, it sums in integers instead
//! (`depthwise_int8.rs`).

use std::sync::Arc;

use tract_core::internal::{
    AxisOp, DatumType, EvalContext, EvalOp, Op, OutletId, StaticName, TValue, TVec, TractResult, TypedFact, TypedModel,
    TypedModelPatch, TypedOp,
};
use tract_core::ops::cnn::{Conv, KernelFormat, PaddingSpec};
use tract_core::ops::nn::DataFormat;

use super::epilogue::{const_f32, eval_into, output_fact, same_bits, scalar_const, Applied, Epilogue};
use super::quant_dequant::QuantDequant;

#[path = "depthwise_int8.rs"]
mod int;
use int::IntDw;

/// The op name tract's plan (and `inspect`'s operator counts) show.
pub const OP_NAME: &str = "EdgeinferDepthwise";

/// The largest kernel side: MobileNet V1-V2 use 3x3, V3 and EfficientNet
/// 5x5 too. The loops take the side as a constant, with arrays of this size.
const KMAX: usize = 5;

/// Kernel sides this operator computes.
const SIDES: [usize; 2] = [3, 5];

/// Output values computed together: one AVX register.
const LANES: usize = 8;

/// A 3x3 or 5x5 depthwise convolution over one `[1, C, H, W]` or `[C, H, W]`
/// f32 tensor, then `clamp(lo, hi)`, then optionally a quantize/dequantize pair.
#[derive(Debug, Clone)]
pub struct Depthwise {
    channels: usize,
    /// Kernel side: one of [`SIDES`].
    k: usize,
    in_hw: [usize; 2],
    strides: [usize; 2],
    /// Zero padding: top, left, bottom, right.
    pad: [usize; 4],
    /// `C x k x k` weights, row-major per channel.
    weights: Arc<[f32]>,
    /// One bias per channel.
    bias: Arc<[f32]>,
    epi: Epilogue,
    /// When the input is `u8` indices on this grid (an int8 operator's
    /// output, [`super::int8_conv`]) instead of f32 values.
    input_u8: Option<QuantDequant>,
    /// Whether the output is each value's index on the pair's grid (`u8`,
    /// for an int8 operator that reads them) instead of the f32 value.
    out_u8: bool,
    /// Integer sums ([`int`]) instead of float ones, when the input is
    /// indices and the weights whole int8 steps (on aarch64).
    int: Option<IntDw>,
    out_shape: TVec<usize>,
}

/// What [`Depthwise`] stores: f32 values, or indices on its pair's grid.
trait Sink: Copy + Default + Send + Sync + 'static {
    /// `v` (a sum) through the epilogue, as stored.
    fn make<const CLAMP: bool, const QDQ: bool>(epi: Applied, v: f32) -> Self;
}

impl Sink for f32 {
    #[inline(always)]
    fn make<const CLAMP: bool, const QDQ: bool>(epi: Applied, v: f32) -> f32 {
        epi.apply::<CLAMP, QDQ>(v)
    }
}

impl Sink for u8 {
    #[inline(always)]
    fn make<const CLAMP: bool, const QDQ: bool>(epi: Applied, v: f32) -> u8 {
        epi.index::<CLAMP>(v)
    }
}

/// What [`Depthwise`] reads: f32 values, or indices on a grid.
trait Source: Copy + Send + Sync + 'static {
    /// The value this input stands for on `grid` (unused for f32).
    fn value(self, grid: QuantDequant) -> f32;
}

impl Source for f32 {
    #[inline(always)]
    fn value(self, _: QuantDequant) -> f32 {
        self
    }
}

impl Source for u8 {
    /// `(index + lo) * scale`: the pair's own `q * scale`, exactly (the sum is a small integer).
    #[inline(always)]
    fn value(self, grid: QuantDequant) -> f32 {
        (self as f32 + grid.lo) * grid.scale
    }
}

impl PartialEq for Depthwise {
    fn eq(&self, other: &Self) -> bool {
        self.channels == other.channels
            && self.k == other.k
            && self.in_hw == other.in_hw
            && self.strides == other.strides
            && self.pad == other.pad
            && same_bits(&self.weights, &other.weights)
            && same_bits(&self.bias, &other.bias)
            && self.epi == other.epi
            && self.input_u8 == other.input_u8
            && self.out_u8 == other.out_u8
            && self.int == other.int
            && self.out_shape == other.out_shape
    }
}

// Equality is on bit patterns, an equivalence even for NaN.
impl Eq for Depthwise {}

impl Depthwise {
    /// The grid this operator's output lies on, when it ends in a
    /// quantize/dequantize pair (the clip comes before it).
    pub fn output_grid(&self) -> Option<QuantDequant> {
        self.epi.qdq
    }

    /// This operator reading `u8` indices on `grid` instead of f32 values,
    /// if it reads f32 values now.
    pub fn reading_indices(&self, grid: QuantDequant) -> Option<Depthwise> {
        // On ARM the integer loops measured far cheaper than the float ones
        // (docs/int8-kernels.md); on x86-64 the float loops stay.
        let int = if cfg!(any(target_arch = "aarch64", target_arch = "arm")) {
            IntDw::new(self.k, &self.weights, &self.bias, &self.epi, grid)
        } else {
            None
        };
        self.input_u8.is_none().then(|| Depthwise { input_u8: Some(grid), int, ..self.clone() })
    }

    /// This operator storing its pair's `u8` indices instead of f32 values,
    /// if it ends in a pair and stores values now.
    pub fn writing_indices(&self) -> Option<Depthwise> {
        (self.epi.qdq.is_some() && !self.out_u8).then(|| Depthwise { out_u8: true, ..self.clone() })
    }

    /// Output height and width: the last two axes of the output.
    fn out_hw(&self) -> [usize; 2] {
        let n = self.out_shape.len();
        [self.out_shape[n - 2], self.out_shape[n - 1]]
    }

    /// The padded planes' layout: height, the row length of each column
    /// phase (wide enough for whole blocks of `LANES` outputs), the output
    /// width rounded up to whole blocks.
    fn layout(&self) -> (usize, usize, usize) {
        let hp = self.in_hw[0] + self.pad[0] + self.pad[2];
        let wp = self.in_hw[1] + self.pad[1] + self.pad[3];
        let wo_blocks = self.out_hw()[1].next_multiple_of(LANES);
        let row = wp.div_ceil(self.strides[1]).max((self.k - 1) / self.strides[1] + wo_blocks);
        (hp, row, wo_blocks)
    }

    /// Values in the padded planes of one channel: every column phase, plus
    /// one block of slack that the last blocks of the last row may read.
    fn planes_len(&self) -> usize {
        let (hp, row_len, _) = self.layout();
        self.strides[1] * hp * row_len + LANES
    }

    /// Runs channels `first..first + out.len() / plane` of `x` into `out`,
    /// through `planes` ([`Self::planes_len`] zeros).
    #[inline(always)]
    fn run_channels<T: Source, U: Sink, const CLAMP: bool, const QDQ: bool, const SH: usize, const K: usize>(
        &self,
        x: &[T],
        out: &mut [U],
        first: usize,
        planes: &mut [f32],
    ) {
        // Copied out of `self` so the hot loop keeps them in registers.
        let epi = self.epi.by_value();
        let grid = self.input_u8.unwrap_or(QuantDequant::IDENTITY);
        let [h, w] = self.in_hw;
        let [ho, wo] = self.out_hw();
        let sw = self.strides[1];
        let (hp, row_len, wo_blocks) = self.layout();
        let phase = hp * row_len;
        // Zeroed by the caller once: each channel writes the same interior
        // positions, so the padding stays zero. The blocks past the last
        // output of a row read whatever follows (the next row, or the slack)
        // into values that are never stored.
        let taps_at: [usize; KMAX] = std::array::from_fn(|dx| (dx % sw) * phase + dx / sw);
        let mut last = [U::default(); LANES];
        for (ix, out) in out.chunks_exact_mut(ho * wo).enumerate() {
            let c = first + ix;
            let src = &x[c * h * w..][..h * w];
            for (y, row) in src.chunks_exact(w).enumerate() {
                let at = (y + self.pad[0]) * row_len;
                if sw == 1 {
                    for (d, &v) in planes[at + self.pad[1]..][..w].iter_mut().zip(row) {
                        *d = v.value(grid);
                    }
                } else {
                    // Column `col` of the padded row goes to phase `col % 2`, at `col / 2`.
                    let odd_first = self.pad[1] % 2;
                    let start = self.pad[1] / 2;
                    let (even, odd) = planes.split_at_mut(phase);
                    let (to_first, to_second) = if odd_first == 0 { (even, odd) } else { (odd, even) };
                    let second_start = self.pad[1].div_ceil(2);
                    // Both columns of a pair in one iteration: the compiler
                    // vectorises that with shuffles, not two strided loops.
                    let pairs = w / 2;
                    let firsts = &mut to_first[at + start..][..w.div_ceil(2)];
                    let seconds = &mut to_second[at + second_start..][..pairs];
                    for ((pair, a), b) in row.chunks_exact(2).zip(firsts.iter_mut()).zip(seconds.iter_mut()) {
                        *a = pair[0].value(grid);
                        *b = pair[1].value(grid);
                    }
                    if w % 2 == 1 {
                        firsts[pairs] = row[w - 1].value(grid);
                    }
                }
            }
            let k = &self.weights[c * K * K..][..K * K];
            let bias = self.bias[c];
            // Two output rows at a time: with a vertical stride of `SH` they
            // read `SH + K` input rows, not `2 * K`, and share the weights.
            for (pair, out_rows) in out.chunks_mut(2 * wo).enumerate() {
                let first_row = 2 * pair * SH;
                // Only the first `K + SH` rows and `K` taps are read.
                let rows: [[&[f32]; KMAX]; KMAX + 2] = std::array::from_fn(|i| {
                    let i = if first_row + i < hp && i < K + SH { i } else { 0 };
                    std::array::from_fn(|dx| match dx < K {
                        true => &planes[(first_row + i) * row_len + taps_at[dx]..][..wo_blocks],
                        false => &[],
                    })
                });
                let (row0, row1) = out_rows.split_at_mut(wo);
                let mut col = 0;
                while col + LANES <= wo {
                    let out0: &mut [U; LANES] = (&mut row0[col..col + LANES]).try_into().expect("a full block");
                    if row1.is_empty() {
                        block::<U, CLAMP, QDQ, SH, false, K>(&rows, k, bias, epi, col, out0, &mut last);
                    } else {
                        let out1: &mut [U; LANES] = (&mut row1[col..col + LANES]).try_into().expect("a full block");
                        block::<U, CLAMP, QDQ, SH, true, K>(&rows, k, bias, epi, col, out0, out1);
                    }
                    col += LANES;
                }
                if col < wo {
                    let mut last0 = [U::default(); LANES];
                    block::<U, CLAMP, QDQ, SH, true, K>(&rows, k, bias, epi, col, &mut last0, &mut last);
                    row0[col..].copy_from_slice(&last0[..wo - col]);
                    if !row1.is_empty() {
                        row1[col..].copy_from_slice(&last[..wo - col]);
                    }
                }
            }
        }
    }

    /// Every channel of `x` into `out`, split between threads by channels.
    fn run_all<T: Source, U: Sink>(&self, x: &[T], out: &mut [U]) -> TractResult<()> {
        let [ho, wo] = self.out_hw();
        let work = out.len() * self.k * self.k;
        // One plane per channel.
        tract_linalg::multithread::par_chunks_mut(out, ho * wo, work, |first, chunk| {
            self.run(x, chunk, first);
            Ok(())
        })
    }

    fn run<T: Source, U: Sink>(&self, x: &[T], out: &mut [U], first: usize) {
        thread_local! {
            /// The padded planes, kept by each thread between inferences and
            /// operators so that running one allocates nothing.
            static PLANES: std::cell::RefCell<Vec<f32>> = const { std::cell::RefCell::new(Vec::new()) };
        }
        PLANES.with_borrow_mut(|planes| {
            planes.clear();
            planes.resize(self.planes_len(), 0.0);
            let p = planes.as_mut_slice();
            match (self.epi.clamps(), self.epi.qdq.is_some(), self.strides[0] == 2) {
                (true, false, false) => self.run_side::<T, U, true, false, 1>(x, out, first, p),
                (true, false, true) => self.run_side::<T, U, true, false, 2>(x, out, first, p),
                (false, true, false) => self.run_side::<T, U, false, true, 1>(x, out, first, p),
                (false, true, true) => self.run_side::<T, U, false, true, 2>(x, out, first, p),
                (true, true, false) => self.run_side::<T, U, true, true, 1>(x, out, first, p),
                (true, true, true) => self.run_side::<T, U, true, true, 2>(x, out, first, p),
                (false, false, false) => self.run_side::<T, U, false, false, 1>(x, out, first, p),
                (false, false, true) => self.run_side::<T, U, false, false, 2>(x, out, first, p),
            }
        })
    }

    /// [`run_fast`] with the kernel side as a constant.
    fn run_side<T: Source, U: Sink, const CLAMP: bool, const QDQ: bool, const SH: usize>(
        &self,
        x: &[T],
        out: &mut [U],
        first: usize,
        planes: &mut [f32],
    ) {
        match self.k {
            3 => run_fast::<T, U, CLAMP, QDQ, SH, 3>(self, x, out, first, planes),
            _ => run_fast::<T, U, CLAMP, QDQ, SH, 5>(self, x, out, first, planes),
        }
    }
}

/// `LANES` outputs from column `col` on, of one output row (`rows[..K]`) or, with
/// `TWO`, of the next one too (`rows[SH..SH + K]`): each the bias plus
/// `K * K` fused multiply-adds in row-major tap order, then the epilogue.
#[inline(always)]
#[allow(clippy::too_many_arguments)]
fn block<U: Sink, const CLAMP: bool, const QDQ: bool, const SH: usize, const TWO: bool, const K: usize>(
    rows: &[[&[f32]; KMAX]; KMAX + 2],
    k: &[f32],
    bias: f32,
    epi: Applied,
    col: usize,
    out0: &mut [U; LANES],
    out1: &mut [U; LANES],
) {
    let mut acc0 = [bias; LANES];
    let mut acc1 = [bias; LANES];
    let used = if TWO { SH + K } else { K };
    for (i, row) in rows.iter().enumerate().take(used) {
        for (dx, taps) in row.iter().enumerate().take(K) {
            let src: &[f32; LANES] = taps[col..col + LANES].try_into().expect("taps cover whole blocks");
            if i < K {
                let w = k[i * K + dx];
                for l in 0..LANES {
                    acc0[l] = src[l].mul_add(w, acc0[l]);
                }
            }
            if TWO && i >= SH {
                let w = k[(i - SH) * K + dx];
                for l in 0..LANES {
                    acc1[l] = src[l].mul_add(w, acc1[l]);
                }
            }
        }
    }
    for (o, a) in out0.iter_mut().zip(acc0) {
        *o = U::make::<CLAMP, QDQ>(epi, a);
    }
    if TWO {
        for (o, a) in out1.iter_mut().zip(acc1) {
            *o = U::make::<CLAMP, QDQ>(epi, a);
        }
    }
}

/// The channel loop, compiled for AVX2 and FMA on x86-64; elsewhere plain
/// (on aarch64 vectorised for its baseline NEON; unused elsewhere:
/// `cpu_supported` keeps the op out of graphs, but the crate builds on every
/// target).
fn run_fast<T: Source, U: Sink, const CLAMP: bool, const QDQ: bool, const SH: usize, const K: usize>(
    op: &Depthwise,
    x: &[T],
    out: &mut [U],
    first: usize,
    planes: &mut [f32],
) {
    #[cfg(target_arch = "x86_64")]
    {
        #[target_feature(enable = "avx2,fma")]
        fn run_avx2_fma<T: Source, U: Sink, const CLAMP: bool, const QDQ: bool, const SH: usize, const K: usize>(
            op: &Depthwise,
            x: &[T],
            out: &mut [U],
            first: usize,
            planes: &mut [f32],
        ) {
            op.run_channels::<T, U, CLAMP, QDQ, SH, K>(x, out, first, planes)
        }
        // SAFETY: the op is only put in a graph when the CPU has AVX2 and FMA (`cpu_supported`).
        unsafe { run_avx2_fma::<T, U, CLAMP, QDQ, SH, K>(op, x, out, first, planes) }
    }
    #[cfg(not(target_arch = "x86_64"))]
    op.run_channels::<T, U, CLAMP, QDQ, SH, K>(x, out, first, planes)
}

/// CPUs this operator is used on: x86-64 with AVX2 and FMA (checked at run
/// time), and aarch64 cores whose int8 kernels are in use (the dot product,
/// or a rung named by `EDGEINFER_ISA`),
/// whose baseline NEON the plain loops vectorise for. There tract-linalg has
/// a channels-last depthwise kernel, and tract's declutter lays float
/// models' depthwise convolutions out channels-last for it, so this operator
/// only matches those of int8 models, which the engine keeps channels-first
/// for the integer operators around them. armv7's baseline has no NEON, so
/// there it only takes a QDQ model's, for its integer loops (`replace`).
pub fn cpu_supported() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma")
    }
    #[cfg(any(target_arch = "aarch64", target_arch = "arm"))]
    {
        super::isa::Isa::int8_in_graphs()
    }
    #[cfg(not(any(target_arch = "x86_64", target_arch = "aarch64", target_arch = "arm")))]
    {
        false
    }
}

impl Op for Depthwise {
    fn name(&self) -> StaticName {
        OP_NAME.into()
    }

    fn info(&self) -> TractResult<Vec<String>> {
        let [sh, sw] = self.strides;
        let (clip, pair) = self.epi.describe();
        let input =
            self.input_u8.map(|g| format!("input: indices (u8) on step {} range [{}, {}]", g.scale, g.lo, g.hi));
        let output = self.out_u8.then(|| "output: the pair's indices (u8)".to_string());
        let sums = self.int.as_ref().map(|_| format!("sums: integer (int8 weights, {})", int::loops(self)));
        let k = self.k;
        let first = format!("{k}x{k} stride {sh}x{sw} pad {:?}, {clip}", self.pad);
        Ok([first].into_iter().chain(pair).chain(input).chain(output).chain(sums).collect())
    }

    fn as_typed(&self) -> Option<&dyn TypedOp> {
        Some(self)
    }
}

impl EvalOp for Depthwise {
    fn eval(&self, _ctx: &EvalContext, inputs: TVec<TValue>) -> TractResult<TVec<TValue>> {
        let [h, w] = self.in_hw;
        let len = self.channels * h * w;
        let shape = &self.out_shape;
        if let Some(iw) = &self.int {
            return match self.out_u8 {
                false => eval_into::<u8, f32>(OP_NAME, &inputs, len, shape, |x, out| int::run_all(self, iw, x, out)),
                true => eval_into::<u8, u8>(OP_NAME, &inputs, len, shape, |x, out| int::run_all(self, iw, x, out)),
            };
        }
        match (self.input_u8.is_some(), self.out_u8) {
            (false, false) => eval_into::<f32, f32>(OP_NAME, &inputs, len, shape, |x, out| self.run_all(x, out)),
            (false, true) => eval_into::<f32, u8>(OP_NAME, &inputs, len, shape, |x, out| self.run_all(x, out)),
            (true, false) => eval_into::<u8, f32>(OP_NAME, &inputs, len, shape, |x, out| self.run_all(x, out)),
            (true, true) => eval_into::<u8, u8>(OP_NAME, &inputs, len, shape, |x, out| self.run_all(x, out)),
        }
    }

    fn eval_out_of_plan(&self, inputs: TVec<TValue>) -> TractResult<Option<TVec<TValue>>> {
        Ok(Some(self.eval(&EvalContext::out_of_plan(), inputs)?))
    }
}

impl TypedOp for Depthwise {
    fn as_op(&self) -> &dyn Op {
        self
    }

    fn as_op_mut(&mut self) -> &mut dyn Op {
        self
    }

    fn output_facts(&self, inputs: &[&TypedFact]) -> TractResult<TVec<TypedFact>> {
        let dt = |bytes: bool| if bytes { DatumType::U8 } else { DatumType::F32 };
        output_fact(inputs, dt(self.input_u8.is_some()), dt(self.out_u8), &self.out_shape)
    }
}

/// The whole f32 contents of a constant with `len` values.
fn const_values(model: &TypedModel, outlet: OutletId, len: usize) -> Option<Vec<f32>> {
    const_f32(model, outlet).map(|(_, v)| v).filter(|v| v.len() == len)
}

/// The operator for the `Conv` at `node`, if it is a 3x3 or 5x5 f32
/// depthwise convolution of one channels-first image this module computes.
fn for_conv(model: &TypedModel, node: usize) -> Option<Depthwise> {
    let node = model.node(node);
    let conv = node.op_as::<Conv>()?;
    let spec = &conv.pool_spec;
    let channels = spec.input_channels;
    let plain = conv.q_params.is_none() && conv.kernel_fmt == KernelFormat::OIHW && node.inputs.len() == 3;
    let depthwise = conv.group == channels && spec.output_channels == channels && channels > 0;
    let k = spec.kernel_shape[0];
    if !plain || !depthwise || spec.kernel_shape.as_slice() != [k, k] || !SIDES.contains(&k) {
        return None;
    }
    let ones = |v: &Option<TVec<usize>>| v.as_ref().is_none_or(|v| v.iter().all(|&d| d == 1));
    let strides = match spec.strides.as_deref() {
        None => [1, 1],
        Some(&[sh, sw]) if (1..=2).contains(&sh) && (1..=2).contains(&sw) => [sh, sw],
        _ => return None,
    };
    if !ones(&spec.dilations) {
        return None;
    }
    let pad = match &spec.padding {
        PaddingSpec::Valid => [0; 4],
        PaddingSpec::Explicit(b, a) | PaddingSpec::ExplicitOnnxPool(b, a, false) if b.len() == 2 && a.len() == 2 => {
            [b[0], b[1], a[0], a[1]]
        }
        _ => return None,
    };
    let input = model.outlet_fact(node.inputs[0]).ok()?;
    let in_shape = input.shape.as_concrete()?;
    let hw = match (spec.data_format, in_shape) {
        (DataFormat::NCHW, &[1, c, h, w]) | (DataFormat::CHW, &[c, h, w]) if c == channels => [h, w],
        _ => return None,
    };
    if input.datum_type != DatumType::F32 || hw[0] + pad[0] + pad[2] < k || hw[1] + pad[1] + pad[3] < k {
        return None;
    }
    let out_hw = [(hw[0] + pad[0] + pad[2] - k) / strides[0] + 1, (hw[1] + pad[1] + pad[3] - k) / strides[1] + 1];
    let output = &node.outputs[0].fact;
    let out_shape: TVec<usize> = output.shape.as_concrete()?.into();
    if output.datum_type != DatumType::F32 || out_shape[out_shape.len() - 2..] != out_hw {
        return None;
    }
    // OIHW with one input channel per group: [C, 1, k, k].
    if model.outlet_fact(node.inputs[1]).ok()?.shape.as_concrete()? != [channels, 1, k, k] {
        return None;
    }
    let weights = const_values(model, node.inputs[1], channels * k * k)?;
    let bias = match const_values(model, node.inputs[2], channels) {
        Some(b) => b,
        None => vec![scalar_const(model, node.inputs[2])?; channels],
    };
    Some(Depthwise {
        channels,
        k,
        in_hw: hw,
        strides,
        pad,
        weights: weights.into(),
        bias: bias.into(),
        epi: Epilogue::NONE,
        input_u8: None,
        out_u8: false,
        int: None,
        out_shape,
    })
}

/// Follows the only consumers of `op`'s output while they are a clip bound
/// (`Max` or `Min` with a single-valued constant), one quantize/dequantize
/// pair, or axis changes between them, and folds the element-wise ones into
/// `op`. Returns the last outlet folded in (the convolution's own when
/// nothing was) and the axis changes to apply after the operator.
fn fold_epilogue(model: &TypedModel, conv: usize, op: &mut Depthwise) -> (OutletId, Vec<(String, AxisOp)>) {
    let outputs = model.output_outlets().map(|o| o.to_vec()).unwrap_or_default();
    let mut end = OutletId::new(conv, 0);
    let mut axes = Vec::new();
    let mut pending = Vec::new();
    let mut cur = end;
    loop {
        let node = model.node(cur.node);
        let succs = &node.outputs[cur.slot].successors;
        if outputs.contains(&cur) || succs.len() != 1 {
            break;
        }
        let next = model.node(succs[0].node);
        if let Some(axis) = next.op_as::<AxisOp>() {
            pending.push((next.name.clone(), axis.clone()));
        } else if op.epi.fold(model, cur, next) {
            axes.append(&mut pending);
            end = OutletId::new(next.id, 0);
        } else {
            break;
        }
        cur = OutletId::new(next.id, 0);
    }
    (end, axes)
}

/// Replaces each 3x3 or 5x5 f32 depthwise `Conv` of a decluttered graph, and the
/// clip or quantize/dequantize pair after it, by [`Depthwise`]; runs before
/// tract's code generation. Returns how many convolutions were replaced.
pub fn use_for_depthwise_convs(model: &mut TypedModel) -> TractResult<usize> {
    if !cpu_supported() {
        return Ok(0);
    }
    // 32-bit ARM: only the convolutions whose input is a static pair's (a
    // QDQ model's), which the integer loops take once their input is
    // indices; this target's float loops have no NEON, and measured slower
    // than tract's (docs/int8-kernels.md).
    replace(model, true, cfg!(target_arch = "arm"))
}

/// The replacement, with or without folding what follows (the tests compare
/// both), of every convolution or only those that read a quantize/dequantize pair.
fn replace(model: &mut TypedModel, fold: bool, only_after_pairs: bool) -> TractResult<usize> {
    let convs: Vec<usize> = model.nodes().iter().filter(|n| n.op_is::<Conv>()).map(|n| n.id).collect();
    let mut replaced = 0;
    for id in convs {
        if only_after_pairs && QuantDequant::of(model.node(model.node(id).inputs[0].node)).is_none() {
            continue;
        }
        let Some(mut op) = for_conv(model, id) else { continue };
        let (end, axes) = if fold { fold_epilogue(model, id, &mut op) } else { (OutletId::new(id, 0), vec![]) };
        let node = model.node(id);
        let mut patch = TypedModelPatch::new(format!("{OP_NAME} for {}", node.name));
        let tap = patch.tap_model(model, node.inputs[0])?;
        let mut wire = patch.wire_node(&node.name, op, &[tap])?[0];
        for (name, axis) in axes {
            wire = patch.wire_node(name, axis, &[wire])?[0];
        }
        patch.shunt_outside(model, end, wire)?;
        patch.apply(model)?;
        replaced += 1;
    }
    if replaced > 0 {
        model.compact()?;
    }
    Ok(replaced)
}

#[cfg(test)]
pub(super) mod tests {
    use super::*;
    use tract_core::internal::{tensor0, tvec, DatumTypeExt, IntoRunnable, SpecialOps, Tensor};
    use tract_core::ops::binary::TypedBinOp;
    use tract_core::ops::cnn::PoolSpec;
    use tract_core::ops::element_wise::ElementWiseOp;
    use tract_core::ops::math::{Max, Min};
    use tract_core::prelude::IntoTValue;

    /// A deterministic spread of values in [-1, 1).
    pub(in crate::engine) fn values(n: usize, seed: u32) -> Vec<f32> {
        let mut s = seed.wrapping_mul(2_654_435_761).wrapping_add(1);
        (0..n)
            .map(|_| {
                s ^= s << 13;
                s ^= s >> 17;
                s ^= s << 5;
                (s % 20_000) as f32 / 10_000.0 - 1.0
            })
            .collect()
    }

    /// What follows the convolution in a test graph.
    #[derive(Clone, Copy)]
    enum Then {
        Max(f32),
        Min(f32),
        QuantDequant(f32, f32, f32),
        DropBatchAxis,
    }

    struct Case {
        channels: usize,
        k: usize,
        hw: [usize; 2],
        strides: [usize; 2],
        pad: [usize; 4],
        batch_axis: bool,
    }

    /// A graph of one depthwise convolution and `then`, and an input for it.
    fn graph(case: &Case, then: &[Then]) -> (TypedModel, Tensor) {
        let Case { channels: c, k, hw: [h, w], strides, pad, batch_axis } = *case;
        let mut shape: TVec<usize> = tvec![c, h, w];
        if batch_axis {
            shape.insert(0, 1);
        }
        let mut model = TypedModel::default();
        let mut wire = model.add_source("x", DatumType::F32.fact(&*shape)).unwrap();
        let kernel = Tensor::from_shape(&[c, 1, k, k], &values(c * k * k, 7)).unwrap();
        let bias = Tensor::from_shape(&[c], &values(c, 11)).unwrap();
        let kernel = model.add_const("kernel", kernel).unwrap();
        let bias = model.add_const("bias", bias).unwrap();
        let fmt = if batch_axis { DataFormat::NCHW } else { DataFormat::CHW };
        let padding = PaddingSpec::Explicit(tvec![pad[0], pad[1]], tvec![pad[2], pad[3]]);
        let spec = PoolSpec::new(fmt, tvec![k, k], padding, None, Some(tvec![strides[0], strides[1]]), c, c);
        let conv = Conv::new(spec, KernelFormat::OIHW, c, None);
        wire = model.wire_node("conv", conv, &[wire, kernel, bias]).unwrap()[0];
        for (i, step) in then.iter().enumerate() {
            let rank = model.outlet_fact(wire).unwrap().rank();
            let bound = |model: &mut TypedModel, v: f32| {
                let t = tensor0(v).broadcast_into_rank(rank).unwrap();
                model.add_const(format!("bound{i}"), t).unwrap()
            };
            wire = match *step {
                Then::Max(v) => {
                    let b = bound(&mut model, v);
                    model.wire_node(format!("max{i}"), TypedBinOp(Box::new(Max), None), &[wire, b]).unwrap()[0]
                }
                Then::Min(v) => {
                    let b = bound(&mut model, v);
                    model.wire_node(format!("min{i}"), TypedBinOp(Box::new(Min), None), &[b, wire]).unwrap()[0]
                }
                Then::QuantDequant(scale, lo, hi) => {
                    let op = ElementWiseOp(Box::new(QuantDequant::new(scale, lo, hi)), None);
                    model.wire_node(format!("qdq{i}"), op, &[wire]).unwrap()[0]
                }
                Then::DropBatchAxis => model.wire_node(format!("rm{i}"), AxisOp::Rm(0), &[wire]).unwrap()[0],
            };
        }
        model.select_output_outlets(&[wire]).unwrap();
        let input = Tensor::from_shape(&shape, &values(shape.iter().product(), 3)).unwrap();
        (model, input)
    }

    /// Optimises `model` (with ours when `ours` says how) and runs it.
    fn run(mut model: TypedModel, input: &Tensor, ours: Option<bool>) -> (Vec<f32>, Vec<String>) {
        model.declutter().unwrap();
        if let Some(fold) = ours {
            assert_eq!(replace(&mut model, fold, false).unwrap(), 1, "the convolution is replaced");
        }
        model.optimize().unwrap();
        let ops = model.nodes().iter().map(|n| n.op.name().to_string()).collect();
        let out = model.into_runnable().unwrap().run(tvec!(input.clone().into_tvalue())).unwrap();
        (out[0].try_as_plain_ram().unwrap().as_slice::<f32>().unwrap().to_vec(), ops)
    }

    /// `run` with our operator, on a pool of `threads` threads.
    #[cfg(feature = "threads")]
    fn run_on_threads(model: TypedModel, input: &Tensor, threads: usize) -> Vec<f32> {
        use tract_linalg::multithread::{multithread_tract_scope, Executor};
        multithread_tract_scope(Executor::multithread(threads), || run(model, input, Some(true)).0)
    }

    fn cases() -> Vec<Case> {
        let case = |channels, k, hw, strides, pad, batch_axis| Case { channels, k, hw, strides, pad, batch_axis };
        vec![
            case(5, 3, [7, 9], [1, 1], [1, 1, 1, 1], true),
            case(4, 3, [8, 8], [2, 2], [1, 1, 1, 1], true),
            case(3, 3, [9, 11], [2, 2], [1, 1, 1, 1], false),
            // Wider than one block of LANES, asymmetric padding, mixed strides.
            case(4, 3, [6, 37], [1, 2], [0, 1, 1, 0], true),
            case(2, 3, [5, 40], [2, 1], [0, 0, 0, 0], false),
            case(3, 3, [3, 3], [1, 1], [0, 0, 0, 0], true),
            // 5x5 (MobileNetV3, EfficientNet): "same" padding of 2, stride 2
            // padded 1 and 2 (TF's SAME), unpadded, the smallest input.
            case(5, 5, [7, 9], [1, 1], [2, 2, 2, 2], true),
            case(4, 5, [14, 14], [2, 2], [1, 1, 2, 2], true),
            case(3, 5, [9, 21], [2, 2], [2, 2, 2, 2], false),
            case(4, 5, [6, 37], [1, 2], [0, 2, 1, 0], true),
            case(2, 5, [5, 40], [2, 1], [0, 0, 0, 0], false),
            case(3, 5, [5, 5], [1, 1], [0, 0, 0, 0], true),
        ]
    }

    #[test]
    fn matches_tracts_depthwise_convolution() {
        if !cpu_supported() {
            eprintln!("skipped: {OP_NAME} is not used on this CPU");
            return;
        }
        for case in cases() {
            let (model, input) = graph(&case, &[]);
            let (want, _) = run(model.clone(), &input, None);
            let (got, ops) = run(model, &input, Some(true));
            assert!(ops.iter().any(|o| o == OP_NAME) && !ops.iter().any(|o| o.contains("DepthWise")), "{ops:?}");
            assert_eq!(got.len(), want.len());
            for (i, (g, w)) in got.iter().zip(&want).enumerate() {
                assert!((g - w).abs() <= 1e-5, "case {:?} {:?} value {i}: {g} against {w}", case.hw, case.strides);
            }
        }
    }

    #[test]
    #[cfg(feature = "threads")]
    fn splits_channels_across_threads_with_the_same_values() {
        if !cpu_supported() {
            eprintln!("skipped: {OP_NAME} is not used on this CPU");
            return;
        }
        // Large enough for tract's threading threshold (32768 values of work).
        for (k, strides) in [(3, [1, 1]), (3, [2, 2]), (5, [1, 1]), (5, [2, 2])] {
            let pad = [k / 2; 4];
            let case = Case { channels: 8, k, hw: [24, 40], strides, pad, batch_axis: true };
            let (model, input) = graph(&case, &[Then::Max(0.0), Then::Min(6.0)]);
            let one = run_on_threads(model.clone(), &input, 1);
            let two = run_on_threads(model, &input, 2);
            let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
            assert_eq!(bits(&one), bits(&two), "{k}x{k} strides {strides:?}");
        }
    }

    #[test]
    fn folds_clips_and_the_quantize_dequantize_pair_with_their_own_arithmetic() {
        if !cpu_supported() {
            eprintln!("skipped: {OP_NAME} is not used on this CPU");
            return;
        }
        let qdq = Then::QuantDequant(6.0 / 255.0, 0.0, 255.0);
        let chains: Vec<Vec<Then>> = vec![
            vec![Then::Max(0.0), Then::Min(6.0)],
            vec![Then::DropBatchAxis, Then::Max(0.0), Then::Min(0.5)],
            vec![Then::Min(0.25), Then::Max(-0.25)],
            // Bounds that cross: the result is the last bound everywhere.
            vec![Then::Max(0.5), Then::Min(0.1)],
            vec![Then::DropBatchAxis, qdq],
            vec![Then::Max(0.0), Then::DropBatchAxis, Then::Min(0.6), qdq],
        ];
        for (i, chain) in chains.into_iter().enumerate() {
            // Every other chain after a 5x5 kernel.
            let (k, pad) = if i % 2 == 0 { (3, [1; 4]) } else { (5, [2; 4]) };
            let case = Case { channels: 6, k, hw: [10, 35], strides: [1, 1], pad, batch_axis: true };
            let (model, input) = graph(&case, &chain);
            let (fused, ops) = run(model.clone(), &input, Some(true));
            let (apart, apart_ops) = run(model.clone(), &input, Some(false));
            let (tract, _) = run(model, &input, None);
            // Folded: no element-wise pass is left after the convolution.
            assert!(
                !ops.iter().any(|o| o.contains("Max") || o.contains("Min") || o.contains("QuantDequant")),
                "{ops:?}"
            );
            assert!(apart_ops.len() > ops.len(), "{apart_ops:?} against {ops:?}");
            let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
            assert_eq!(bits(&fused), bits(&apart), "folding changed a value");
            // Against tract's convolution, the sums may differ in their last
            // bits, so a value may land one quantization step away, rarely.
            let step = 6.0 / 255.0 + 1e-6;
            let off = fused.iter().zip(&tract).filter(|(f, t)| (*f - *t).abs() > 1e-5).count();
            assert!(fused.iter().zip(&tract).all(|(f, t)| (f - t).abs() <= step), "more than one step away");
            assert!(off * 100 <= fused.len(), "{off} of {} values differ from tract's", fused.len());
        }
    }
}
