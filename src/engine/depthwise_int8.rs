//! Integer sums for [`Depthwise`] when it reads 8-bit grid indices and its
//! weights are whole int8 steps (a QDQ model's depthwise convolutions on the
//! aarch64 rungs): each output is `sum(q_w * (n - zero))`, an exact integer,
//! then `* (s_w * s_x) + bias` and the epilogue.
//!
//! The float loops of [`Depthwise`] spent most of a Pi core's depthwise
//! instructions widening each index to f32 and on nine separate loads per
//! four outputs (37.9 M of 102 M instructions for MobileNetV2 int8 on a
//! Cortex-A76). Here each channel's indices are copied once into planes and
//! summed in blocks of 8 outputs by two rows: 16-bit planes with the zero
//! subtracted and `smlal` on every aarch64 core ([`neon`]), signed bytes
//! gathered by `tbl` and `sdot` on cores with the dot product ([`dot`]).
//! With an output pair, the scaling, clip and rounding are one multiply-add
//! and a conversion ([`Requant`]).
//!
//! [`run_plain`] is the reference: plain loops that every vector variant
//! matches bit for bit (the sums are exact; the scaling is one fused
//! multiply-add, then [`Requant`] or the epilogue of [`super::int8_conv`]'s
//! rows).

use std::sync::Arc;

use tract_core::internal::TractResult;

use super::Depthwise;
use crate::engine::epilogue::Epilogue;
use crate::engine::int8_conv::{integer_weights, largest, Out};
use crate::engine::quant_dequant::QuantDequant;

/// A depthwise convolution's weights as int8 steps, for one input grid.
#[derive(Debug, Clone)]
pub(super) struct IntDw {
    /// Taps per channel: 9 or 25.
    taps: usize,
    /// `C x taps` weights in steps, row-major per channel.
    q: Arc<[i16]>,
    /// Per channel, the weights' step times the input grid's.
    mul: Arc<[f32]>,
    /// The input index of the value 0 (padding): minus the grid's low end.
    zero: u8,
    /// With an output pair: straight to the output index, in one multiply-add.
    req: Option<Requant>,
}

/// The epilogue of an operator whose output is rounded onto a grid, folded
/// into the sums' scaling: `index = clamp(round(sum * m + b), ilo, ihi)`,
/// with `m = s_w * s_x / s_out` and `b = bias / s_out - lo_out`, and the
/// clip as index bounds (rounding is monotone, so clipping before or after
/// it is the same). One multiply-add and a conversion instead of the clip,
/// scaling and rounding steps; it can round a value within an ulp of a tie
/// the other way than those steps would, as ONNX Runtime's fixed-point
/// requantization does too.
#[derive(Debug, Clone)]
struct Requant {
    /// Per channel.
    m: Arc<[f32]>,
    /// Per channel.
    b: Arc<[f32]>,
    /// The lowest and highest index the clip and the grid leave.
    ilo: u8,
    ihi: u8,
    /// The output grid's low end (in steps) and step, for f32 outputs.
    lo: f32,
    scale: f32,
}

impl PartialEq for Requant {
    fn eq(&self, other: &Self) -> bool {
        let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
        bits(&self.m) == bits(&other.m)
            && bits(&self.b) == bits(&other.b)
            && (self.ilo, self.ihi) == (other.ilo, other.ihi)
            && (self.lo.to_bits(), self.scale.to_bits()) == (other.lo.to_bits(), other.scale.to_bits())
    }
}

impl Requant {
    /// The folded form of `epi` after sums scaled by `mul` and biased by
    /// `bias`, if it ends in a pair on a grid of at most 256 steps.
    fn new(epi: &Epilogue, mul: &[f32], bias: &[f32]) -> Option<Requant> {
        let qd = epi.qdq?;
        let span = qd.hi - qd.lo;
        if span.is_nan() || span > 255.0 || !qd.inv_scale.is_finite() || qd.inv_scale <= 0.0 {
            return None;
        }
        let index = |v: f32| (v * qd.inv_scale).clamp(qd.lo, qd.hi).round_ties_even() - qd.lo;
        let (ilo, ihi) = (index(epi.clamp.0.max(-f32::MAX)), index(epi.clamp.1.min(f32::MAX)));
        Some(Requant {
            m: mul.iter().map(|m| m * qd.inv_scale).collect(),
            b: bias.iter().map(|b| b * qd.inv_scale - qd.lo).collect(),
            ilo: ilo as u8,
            ihi: ihi as u8,
            lo: qd.lo,
            scale: qd.scale,
        })
    }

    /// Channel `c`'s sum `acc` as its output index.
    #[cfg_attr(all(target_arch = "aarch64", not(test)), allow(dead_code))]
    fn index(&self, c: usize, acc: i32) -> u8 {
        let r = (acc as f32).mul_add(self.m[c], self.b[c]).round_ties_even() as i32;
        r.clamp(self.ilo as i32, self.ihi as i32) as u8
    }
}

/// What the integer loops store: an output index, or the value it stands for.
pub(super) trait IndexOut: Out {
    /// Index `n` on a grid with low end `lo` (in steps) and step `scale`, as stored.
    #[cfg_attr(all(target_arch = "aarch64", not(test)), allow(dead_code))]
    fn from_index(n: u8, lo: f32, scale: f32) -> Self;

    /// [`Self::from_index`] of the first `n` of 8 indices, stored at `ptr` on.
    #[cfg(target_arch = "aarch64")]
    unsafe fn store_indices(
        idx: std::arch::aarch64::uint8x8_t,
        lo: std::arch::aarch64::float32x4_t,
        scale: std::arch::aarch64::float32x4_t,
        ptr: *mut Self,
        n: usize,
    );
}

impl IndexOut for u8 {
    fn from_index(n: u8, _: f32, _: f32) -> u8 {
        n
    }

    #[cfg(target_arch = "aarch64")]
    #[inline(always)]
    unsafe fn store_indices(
        idx: std::arch::aarch64::uint8x8_t,
        _: std::arch::aarch64::float32x4_t,
        _: std::arch::aarch64::float32x4_t,
        ptr: *mut u8,
        n: usize,
    ) {
        crate::engine::int8_conv::neon::store_first_u8(idx, ptr, n)
    }
}

impl IndexOut for f32 {
    fn from_index(n: u8, lo: f32, scale: f32) -> f32 {
        (n as f32 + lo) * scale
    }

    #[cfg(target_arch = "aarch64")]
    #[inline(always)]
    unsafe fn store_indices(
        idx: std::arch::aarch64::uint8x8_t,
        lo: std::arch::aarch64::float32x4_t,
        scale: std::arch::aarch64::float32x4_t,
        ptr: *mut f32,
        n: usize,
    ) {
        use std::arch::aarch64::*;
        let wide = vmovl_u8(idx);
        let halves = [vmovl_u16(vget_low_u16(wide)), vmovl_high_u16(wide)];
        let v = halves.map(|h| vmulq_f32(vaddq_f32(vcvtq_f32_u32(h), lo), scale));
        crate::engine::int8_conv::neon::store_first_f32(v, ptr, n)
    }
}

impl PartialEq for IntDw {
    fn eq(&self, other: &Self) -> bool {
        self.q == other.q
            && self.zero == other.zero
            && self.req == other.req
            && self.mul.iter().map(|m| m.to_bits()).eq(other.mul.iter().map(|m| m.to_bits()))
    }
}

impl Eq for IntDw {}

impl IntDw {
    /// The integer form of `C x 9` float `weights` reading indices on
    /// `grid`, if every channel's weights are whole multiples of one step in
    /// -128..=127 and the grid holds the value 0 (the padding).
    pub(super) fn new(k: usize, weights: &[f32], bias: &[f32], epi: &Epilogue, grid: QuantDequant) -> Option<IntDw> {
        let taps = k * k;
        let zero = -grid.lo;
        if !(0.0..=255.0).contains(&zero) || zero.fract() != 0.0 || !grid.scale.is_finite() {
            return None;
        }
        let top = largest(weights);
        let mut q = Vec::with_capacity(weights.len());
        let mut mul = Vec::with_capacity(weights.len() / taps);
        for row in weights.chunks_exact(taps) {
            let (step, ints) = integer_weights(row, top)?;
            q.extend(ints.iter().map(|&v| v as i16));
            mul.push(step * grid.scale);
        }
        let req = Requant::new(epi, &mul, bias);
        Some(IntDw { taps, q: q.into(), mul: mul.into(), zero: zero as u8, req })
    }

    /// Channel `c`'s weights.
    fn weights(&self, c: usize) -> &[i16] {
        &self.q[c * self.taps..][..self.taps]
    }
}

/// Channels `first..first + out.len() / plane` of the indices `x` into
/// `out`: the reference every vector variant matches.
#[cfg_attr(all(target_arch = "aarch64", not(test)), allow(dead_code))]
pub(super) fn run_plain<U: IndexOut>(op: &Depthwise, iw: &IntDw, x: &[u8], out: &mut [U], first: usize) {
    let [h, w] = op.in_hw;
    let [ho, wo] = op.out_hw();
    let [sh, sw] = op.strides;
    let (pt, pl) = (op.pad[0] as isize, op.pad[1] as isize);
    for (ix, out) in out.chunks_exact_mut(ho * wo).enumerate() {
        let c = first + ix;
        let src = &x[c * h * w..][..h * w];
        let q = iw.weights(c);
        for (oy, row) in out.chunks_exact_mut(wo).enumerate() {
            for (ox, o) in row.iter_mut().enumerate() {
                let mut acc = 0i32;
                for (t, &wt) in q.iter().enumerate() {
                    let iy = (oy * sh + t / op.k) as isize - pt;
                    let ix = (ox * sw + t % op.k) as isize - pl;
                    if (0..h as isize).contains(&iy) && (0..w as isize).contains(&ix) {
                        let n = src[iy as usize * w + ix as usize] as i32 - iw.zero as i32;
                        acc += wt as i32 * n;
                    }
                }
                *o = match &iw.req {
                    Some(r) => U::from_index(r.index(c, acc), r.lo, r.scale),
                    None => U::plain(&op.epi, (acc as f32).mul_add(iw.mul[c], op.bias[c])),
                };
            }
        }
    }
}

/// Every channel of `x` into `out` on the best loops this CPU has, split
/// between threads by channels.
pub(super) fn run_all<U: IndexOut>(op: &Depthwise, iw: &IntDw, x: &[u8], out: &mut [U]) -> TractResult<()> {
    let [ho, wo] = op.out_hw();
    let work = out.len() * iw.taps;
    tract_linalg::multithread::par_chunks_mut(out, ho * wo, work, |first, chunk| {
        run(op, iw, x, chunk, first);
        Ok(())
    })
}

/// Which loops [`run`] takes for `op` on this CPU, for the operator's `info`.
#[cfg_attr(not(target_arch = "aarch64"), allow(unused_variables))]
pub(super) fn loops(op: &Depthwise) -> &'static str {
    #[cfg(target_arch = "aarch64")]
    if crate::engine::isa::Isa::current() == crate::engine::isa::Isa::NeonDot && op.k == 3 {
        return "byte planes, tbl and sdot";
    }
    if cfg!(target_arch = "aarch64") {
        "16-bit planes, smlal"
    } else if cfg!(target_arch = "arm") {
        "16-bit planes, vmlal"
    } else {
        "plain loops"
    }
}

/// Channels `first..` into `out` on the best loops this CPU has.
fn run<U: IndexOut>(op: &Depthwise, iw: &IntDw, x: &[u8], out: &mut [U], first: usize) {
    // The SDOT loops gather three taps a row: 5x5 kernels take `smlal`.
    #[cfg(target_arch = "aarch64")]
    if crate::engine::isa::Isa::current() == crate::engine::isa::Isa::NeonDot && op.k == 3 {
        // SAFETY: the rung in use is only `dotprod` when the CPU has it.
        unsafe { dot::run(op, iw, x, out, first) }
    } else {
        neon::run(op, iw, x, out, first)
    }
    #[cfg(target_arch = "arm")]
    arm32::run(op, iw, x, out, first);
    #[cfg(not(any(target_arch = "aarch64", target_arch = "arm")))]
    run_plain(op, iw, x, out, first);
}

/// Calls `$f::<U, REQ, CLAMP, QDQ, SH, $k...>(op, iw, ...)` with the folded
/// requantization, the clip, the pair and the vertical stride as constants
/// (the channel loops of both aarch64 variants), then the constants in
/// brackets (the kernel side of the `smlal` loops).
#[cfg(target_arch = "aarch64")]
macro_rules! by_variant {
    ($f:ident, [$($k:tt)*], $op:expr, $iw:expr, $($arg:expr),*) => {
        match ($iw.req.is_some(), $op.epi.clamps(), $op.epi.qdq.is_some(), $op.strides[0] == 2) {
            (true, _, _, false) => $f::<U, true, false, false, 1 $(, $k)*>($op, $iw, $($arg),*),
            (true, _, _, true) => $f::<U, true, false, false, 2 $(, $k)*>($op, $iw, $($arg),*),
            (false, true, false, false) => $f::<U, false, true, false, 1 $(, $k)*>($op, $iw, $($arg),*),
            (false, true, false, true) => $f::<U, false, true, false, 2 $(, $k)*>($op, $iw, $($arg),*),
            (false, false, true, false) => $f::<U, false, false, true, 1 $(, $k)*>($op, $iw, $($arg),*),
            (false, false, true, true) => $f::<U, false, false, true, 2 $(, $k)*>($op, $iw, $($arg),*),
            (false, true, true, false) => $f::<U, false, true, true, 1 $(, $k)*>($op, $iw, $($arg),*),
            (false, true, true, true) => $f::<U, false, true, true, 2 $(, $k)*>($op, $iw, $($arg),*),
            (false, false, false, false) => $f::<U, false, false, false, 1 $(, $k)*>($op, $iw, $($arg),*),
            (false, false, false, true) => $f::<U, false, false, false, 2 $(, $k)*>($op, $iw, $($arg),*),
        }
    };
}

#[cfg(target_arch = "aarch64")]
pub(super) mod neon {
    //! The aarch64 loops: 16-bit planes, `smlal` by 8 outputs and two rows,
    //! for 3x3 and 5x5 kernels.

    use std::arch::aarch64::*;

    use super::super::KMAX;
    use super::{Depthwise, IndexOut, IntDw, Requant};
    use crate::engine::int8_conv::neon::Regs;

    /// Outputs per block: two registers of four sums.
    const LANES: usize = 8;

    /// Channels `first..` of the indices `x` into `out`, through planes kept
    /// by the thread between inferences.
    pub(in crate::engine) fn run<U: IndexOut>(op: &Depthwise, iw: &IntDw, x: &[u8], out: &mut [U], first: usize) {
        thread_local! {
            static PLANES: std::cell::RefCell<Vec<i16>> = const { std::cell::RefCell::new(Vec::new()) };
        }
        PLANES.with_borrow_mut(|planes| {
            planes.clear();
            planes.resize(op.planes_len(), 0);
            let p = planes.as_mut_slice();
            // SAFETY: NEON is the aarch64 baseline; the loops' reads and
            // writes are inside `p`, `x` and `out` (checked at their entry).
            unsafe {
                match op.k {
                    3 => by_variant!(channels, [3], op, iw, x, out, first, p),
                    _ => by_variant!(channels, [5], op, iw, x, out, first, p),
                }
            }
        })
    }

    /// Copies one input row of indices into the planes of a stride of 2 as
    /// `n - zero`: column `col` of the padded row to phase `col % 2` at
    /// `col / 2`; `at` holds where source columns 0 and 1 go (their phases
    /// differ). A stride of 1 copies rows in [`channels`].
    #[inline(always)]
    unsafe fn fill_row_s2(src: &[u8], planes: &mut [i16], at: [usize; 2], zero: u8) {
        let z = vdup_n_u8(zero);
        let zq = vdupq_n_u8(zero);
        let w = src.len();
        let (evens, odds) = (w.div_ceil(2), w / 2);
        assert!(at[0] + evens <= planes.len() && at[1] + odds <= planes.len());
        let (d0, d1) = (planes.as_mut_ptr().add(at[0]), planes.as_mut_ptr().add(at[1]));
        let mut i = 0;
        while i + 32 <= w {
            let b = vld2q_u8(src.as_ptr().add(i));
            let (e, o) = (b.0, b.1);
            vst1q_s16(d0.add(i / 2), vreinterpretq_s16_u16(vsubl_u8(vget_low_u8(e), z)));
            vst1q_s16(d0.add(i / 2 + 8), vreinterpretq_s16_u16(vsubl_high_u8(e, zq)));
            vst1q_s16(d1.add(i / 2), vreinterpretq_s16_u16(vsubl_u8(vget_low_u8(o), z)));
            vst1q_s16(d1.add(i / 2 + 8), vreinterpretq_s16_u16(vsubl_high_u8(o, zq)));
            i += 32;
        }
        // By 16 (8 pairs), the last 16 overlapping, from an even column
        // so that the phases stay: then one by one.
        let sixteen = |at: usize| {
            let b = vld2_u8(src.as_ptr().add(at));
            vst1q_s16(d0.add(at / 2), vreinterpretq_s16_u16(vsubl_u8(b.0, z)));
            vst1q_s16(d1.add(at / 2), vreinterpretq_s16_u16(vsubl_u8(b.1, z)));
        };
        if i + 16 <= w {
            sixteen(i);
            i += 16;
        }
        if i < w && w >= 16 {
            let at = (w - 16) & !1;
            sixteen(at);
            i = i.max(at + 16);
        }
        while i < w {
            let v = src[i] as i16 - zero as i16;
            if i % 2 == 0 {
                *d0.add(i / 2) = v;
            } else {
                *d1.add(i / 2) = v;
            }
            i += 1;
        }
    }

    /// The channel loop: fill the planes, then two output rows at a time.
    #[inline(always)]
    #[allow(clippy::too_many_arguments)]
    unsafe fn channels<
        U: IndexOut,
        const REQ: bool,
        const CLAMP: bool,
        const QDQ: bool,
        const SH: usize,
        const K: usize,
    >(
        op: &Depthwise,
        iw: &IntDw,
        x: &[u8],
        out: &mut [U],
        first: usize,
        planes: &mut [i16],
    ) {
        let [h, w] = op.in_hw;
        let [ho, wo] = op.out_hw();
        let sw = op.strides[1];
        let (hp, row_len, wo_blocks) = op.layout();
        let phase = hp * row_len;
        assert!(wo_blocks % LANES == 0 && planes.len() >= op.planes_len() && op.k == K && iw.taps == K * K);
        assert!(x.len() >= (first + out.len() / (ho * wo)) * h * w && first + out.len() / (ho * wo) <= op.channels);
        let taps_at: [usize; KMAX] = std::array::from_fn(|dx| (dx % sw) * phase + dx / sw);
        let regs = Regs::new(&op.epi);
        let req = ReqRegs::new(iw.req.as_ref());
        // Where source columns 0 and 1 land: the padded column `pad + j`
        // goes to phase `(pad + j) % sw`, at `(pad + j) / sw`.
        let col_at = |j: usize| ((op.pad[1] + j) % sw) * phase + (op.pad[1] + j) / sw;
        let cols = [col_at(0), col_at(1.min(w - 1))];
        // Rows of fewer than 8 are copied as 8 values (the rest masked to the
        // padding's 0) where a plane row has room for them.
        let short8 = w < 8 && cols[0] + 8 <= row_len;
        let (z, zq) = (vdup_n_u8(iw.zero), vdupq_n_u8(iw.zero));
        let lane = vld1q_u16([0u16, 1, 2, 3, 4, 5, 6, 7].as_ptr());
        let keep = vreinterpretq_s16_u16(vcltq_u16(lane, vdupq_n_u16(w.min(8) as u16)));
        for (ix, out) in out.chunks_exact_mut(ho * wo).enumerate() {
            let c = first + ix;
            let src = &x[c * h * w..][..h * w];
            if sw == 1 {
                // The rows by pointer, `w` apart in the input and `row_len`
                // in the planes, checked once per channel.
                let first_at = op.pad[0] * row_len + cols[0];
                assert!(first_at + (h - 1) * row_len + if short8 { 8 } else { w } <= planes.len());
                let (s0, d0) = (src.as_ptr(), planes.as_mut_ptr().add(first_at));
                let eight = |d: *mut i16, s: *const u8| vst1q_s16(d, vreinterpretq_s16_u16(vsubl_u8(vld1_u8(s), z)));
                for y in 0..h {
                    let (s, d) = (s0.add(y * w), d0.add(y * row_len));
                    if w >= 16 {
                        // By 16, the last 16 overlapping what is done.
                        let sixteen = |i: usize| {
                            let b = vld1q_u8(s.add(i));
                            vst1q_s16(d.add(i), vreinterpretq_s16_u16(vsubl_u8(vget_low_u8(b), z)));
                            vst1q_s16(d.add(i + 8), vreinterpretq_s16_u16(vsubl_high_u8(b, zq)));
                        };
                        let mut i = 0;
                        while i + 16 < w {
                            sixteen(i);
                            i += 16;
                        }
                        sixteen(w - 16);
                    } else if w >= 8 {
                        eight(d, s);
                        eight(d.add(w - 8), s.add(w - 8));
                    } else if short8 && c * h * w + y * w + 8 <= x.len() {
                        // 8 bytes read where the input goes on that far
                        // (from `x`, checked here).
                        let v = vsubl_u8(vld1_u8(x.as_ptr().add(c * h * w + y * w)), z);
                        vst1q_s16(d, vandq_s16(vreinterpretq_s16_u16(v), keep));
                    } else {
                        for i in 0..w {
                            *d.add(i) = *s.add(i) as i16 - iw.zero as i16;
                        }
                    }
                }
            } else {
                for (y, row) in src.chunks_exact(w).enumerate() {
                    let base = (y + op.pad[0]) * row_len;
                    fill_row_s2(row, planes, cols.map(|c| base + c), iw.zero);
                }
            }
            let q = &iw.weights(c)[..K * K];
            // 25 registers for a 5x5 kernel: the compiler keeps some on the stack.
            let k: [int16x8_t; KMAX * KMAX] = std::array::from_fn(|t| vdupq_n_s16(if t < K * K { q[t] } else { 0 }));
            let (mul, bias) = match &iw.req {
                Some(r) if REQ => (vdupq_n_f32(r.m[c]), vdupq_n_f32(r.b[c])),
                _ => (vdupq_n_f32(iw.mul[c]), vdupq_n_f32(op.bias[c])),
            };
            let out = out.as_mut_ptr();
            let (last, n) = (wo.saturating_sub(LANES), wo.min(LANES));
            for pair in 0..ho.div_ceil(2) {
                let first_row = 2 * pair * SH;
                let two = 2 * pair + 1 < ho;
                let rows: [*const i16; KMAX + 2] = std::array::from_fn(|i| {
                    let i = if first_row + i < hp && i < K + SH { i } else { 0 };
                    planes.as_ptr().add((first_row + i) * row_len)
                });
                let dst = out.add(2 * pair * wo);
                // Whole blocks only, the last one ending at the row's end
                // (recomputing a few outputs): a shorter store costs a copy
                // through the stack, and one past the row would land on
                // outputs of the next row already stored. Rows shorter than
                // a block are stored in part.
                let mut col = 0;
                loop {
                    let at = col.min(last);
                    if two {
                        let acc = block::<SH, true, K>(&rows, &taps_at, &k, at);
                        store::<U, REQ, CLAMP, QDQ>(&regs, &req, acc[0], mul, bias, dst.add(at), n);
                        store::<U, REQ, CLAMP, QDQ>(&regs, &req, acc[1], mul, bias, dst.add(wo + at), n);
                    } else {
                        let acc = block::<SH, false, K>(&rows, &taps_at, &k, at);
                        store::<U, REQ, CLAMP, QDQ>(&regs, &req, acc[0], mul, bias, dst.add(at), n);
                    }
                    if at == last {
                        break;
                    }
                    col += LANES;
                }
            }
        }
    }

    /// The sums of 8 outputs from column `col` of one output row (its input
    /// rows `rows[..K]`) and, with `TWO`, of the next (`rows[SH..SH + K]`).
    #[inline(always)]
    unsafe fn block<const SH: usize, const TWO: bool, const K: usize>(
        rows: &[*const i16; KMAX + 2],
        taps_at: &[usize; KMAX],
        k: &[int16x8_t; KMAX * KMAX],
        col: usize,
    ) -> [[int32x4_t; 2]; 2] {
        let mut acc = [[vdupq_n_s32(0); 2]; 2];
        let used = if TWO { SH + K } else { K };
        for (i, row) in rows.iter().enumerate().take(used) {
            for (dx, &at) in taps_at.iter().enumerate().take(K) {
                let v = vld1q_s16(row.add(at + col));
                if i < K {
                    let w = k[i * K + dx];
                    acc[0][0] = vmlal_s16(acc[0][0], vget_low_s16(v), vget_low_s16(w));
                    acc[0][1] = vmlal_high_s16(acc[0][1], v, w);
                }
                if TWO && i >= SH {
                    let w = k[(i - SH) * K + dx];
                    acc[1][0] = vmlal_s16(acc[1][0], vget_low_s16(v), vget_low_s16(w));
                    acc[1][1] = vmlal_high_s16(acc[1][1], v, w);
                }
            }
        }
        acc
    }

    /// `sum * mul + bias` (fused, as the reference's `mul_add`), then the
    /// epilogue, into `ptr[..n]`.
    #[inline(always)]
    #[allow(clippy::too_many_arguments)]
    pub(super) unsafe fn store<U: IndexOut, const REQ: bool, const CLAMP: bool, const QDQ: bool>(
        regs: &Regs,
        req: &ReqRegs,
        acc: [int32x4_t; 2],
        mul: float32x4_t,
        bias: float32x4_t,
        ptr: *mut U,
        n: usize,
    ) {
        let v = acc.map(|a| vfmaq_f32(bias, vcvtq_f32_s32(a), mul));
        if REQ {
            // `Requant::index`: round to nearest even, saturate, clamp.
            let r = v.map(|v| vqmovn_s32(vcvtnq_s32_f32(v)));
            let idx = vmin_u8(vmax_u8(vqmovun_s16(vcombine_s16(r[0], r[1])), req.ilo), req.ihi);
            U::store_indices(idx, req.lo, req.scale, ptr, n);
        } else {
            U::store_neon::<CLAMP, QDQ>(regs, v, ptr, n);
        }
    }

    /// A [`Requant`]'s operator-wide constants in registers.
    pub(super) struct ReqRegs {
        ilo: uint8x8_t,
        ihi: uint8x8_t,
        lo: float32x4_t,
        scale: float32x4_t,
    }

    impl ReqRegs {
        pub(super) fn new(req: Option<&Requant>) -> ReqRegs {
            let (ilo, ihi, lo, scale) = req.map_or((0, 255, 0.0, 1.0), |r| (r.ilo, r.ihi, r.lo, r.scale));
            // SAFETY: NEON is the aarch64 baseline.
            unsafe {
                ReqRegs { ilo: vdup_n_u8(ilo), ihi: vdup_n_u8(ihi), lo: vdupq_n_f32(lo), scale: vdupq_n_f32(scale) }
            }
        }
    }
}

#[cfg(target_arch = "arm")]
pub(super) mod arm32 {
    //! The 32-bit ARM loops: 16-bit planes as on aarch64's `neon`, blocks of
    //! 8 outputs by two rows summed with `vmlal.s16` by scalar (3x3 and 5x5
    //! kernels), and the
    //! folded requantization ([`Requant`]) on the same registers; inline
    //! assembly throughout, as in `int8_arm32.rs` (whose module note says
    //! why, and which registers it may use). Operators without an output
    //! pair take the reference loops.

    use std::arch::asm;

    use super::super::KMAX;
    use super::{Depthwise, IndexOut, IntDw, Requant};
    use crate::engine::quant_dequant::ROUND_MAGIC;

    /// Weights loaded per block: a 5x5 kernel's 25 in whole d registers.
    const WTS: usize = 28;

    /// Outputs per block.
    const LANES: usize = 8;

    /// Loads the input row whose pointer is at byte `$at` of `rows` (plus
    /// `col` bytes): its three taps in d16-d21.
    macro_rules! dw_load {
        ($at:literal) => {
            concat!(
                "ldr {p}, [{rows}, #",
                $at,
                "]\n",
                "add {p}, {p}, {col}\n",
                "vld1.16 {{d16, d17}}, [{p}], {t1}\n",
                "vld1.16 {{d18, d19}}, [{p}], {u}\n",
                "vld1.16 {{d20, d21}}, [{p}]\n",
            )
        };
    }

    /// One tap of 8 values (`d$x0`, `d$x1`) times the weight in lane `$w`,
    /// into the sums `q$lo`-`q$hi`.
    macro_rules! dw_tap {
        ($lo:literal, $hi:literal, $x0:literal, $x1:literal, $w:literal) => {
            concat!("vmlal.s16 q", $lo, ", d", $x0, ", ", $w, "\n", "vmlal.s16 q", $hi, ", d", $x1, ", ", $w, "\n",)
        };
    }

    /// The loaded row's three taps times kernel row `$k` (weights in lanes
    /// of d0-d2, four per register), into the sums `q$lo`-`q$hi`.
    macro_rules! dw_macs {
        ($lo:literal, $hi:literal, 0) => {
            dw_macs!($lo, $hi, "d0[0]", "d0[1]", "d0[2]")
        };
        ($lo:literal, $hi:literal, 1) => {
            dw_macs!($lo, $hi, "d0[3]", "d1[0]", "d1[1]")
        };
        ($lo:literal, $hi:literal, 2) => {
            dw_macs!($lo, $hi, "d1[2]", "d1[3]", "d2[0]")
        };
        ($lo:literal, $hi:literal, $a:literal, $b:literal, $c:literal) => {
            concat!(dw_tap!($lo, $hi, 16, 17, $a), dw_tap!($lo, $hi, 18, 19, $b), dw_tap!($lo, $hi, 20, 21, $c))
        };
    }

    /// Loads taps 0-2 of the input row whose pointer is at byte `$at` of
    /// `rows` (plus `col` bytes) in d16-d21, and steps `p` on to tap 3: for a
    /// 5x5 kernel, whose taps alternate the two steps (`t1`, `u`) as a 3x3
    /// one's do.
    macro_rules! dw5_load_a {
        ($at:literal) => {
            concat!(
                "ldr {p}, [{rows}, #",
                $at,
                "]\n",
                "add {p}, {p}, {col}\n",
                "vld1.16 {{d16, d17}}, [{p}], {t1}\n",
                "vld1.16 {{d18, d19}}, [{p}], {u}\n",
                "vld1.16 {{d20, d21}}, [{p}], {t1}\n",
            )
        };
    }

    /// Taps 3 and 4 of the row [`dw5_load_a`] loaded, in d16-d19.
    macro_rules! dw5_load_b {
        () => {
            concat!("vld1.16 {{d16, d17}}, [{p}], {u}\n", "vld1.16 {{d18, d19}}, [{p}]\n")
        };
    }

    /// Taps 0-2 ([`dw5_load_a`]) times 5x5 kernel row `$r` (25 weights in
    /// lanes of d0-d6, row-major) into the sums `q$lo`-`q$hi`.
    macro_rules! dw5_macs_a {
        ($lo:literal, $hi:literal, 0) => {
            dw_macs!($lo, $hi, "d0[0]", "d0[1]", "d0[2]")
        };
        ($lo:literal, $hi:literal, 1) => {
            dw_macs!($lo, $hi, "d1[1]", "d1[2]", "d1[3]")
        };
        ($lo:literal, $hi:literal, 2) => {
            dw_macs!($lo, $hi, "d2[2]", "d2[3]", "d3[0]")
        };
        ($lo:literal, $hi:literal, 3) => {
            dw_macs!($lo, $hi, "d3[3]", "d4[0]", "d4[1]")
        };
        ($lo:literal, $hi:literal, 4) => {
            dw_macs!($lo, $hi, "d5[0]", "d5[1]", "d5[2]")
        };
    }

    /// Taps 3-4 ([`dw5_load_b`]) times 5x5 kernel row `$r`.
    macro_rules! dw5_macs_b {
        ($lo:literal, $hi:literal, 0) => {
            dw5_macs_b!($lo, $hi, "d0[3]", "d1[0]")
        };
        ($lo:literal, $hi:literal, 1) => {
            dw5_macs_b!($lo, $hi, "d2[0]", "d2[1]")
        };
        ($lo:literal, $hi:literal, 2) => {
            dw5_macs_b!($lo, $hi, "d3[1]", "d3[2]")
        };
        ($lo:literal, $hi:literal, 3) => {
            dw5_macs_b!($lo, $hi, "d4[2]", "d4[3]")
        };
        ($lo:literal, $hi:literal, 4) => {
            dw5_macs_b!($lo, $hi, "d5[3]", "d6[0]")
        };
        ($lo:literal, $hi:literal, $a:literal, $b:literal) => {
            concat!(dw_tap!($lo, $hi, 16, 17, $a), dw_tap!($lo, $hi, 18, 19, $b))
        };
    }

    /// One input row of a 5x5 block: its five taps times each listed
    /// kernel row `$r` into the sums `q$lo`-`q$hi`.
    macro_rules! dw5_row {
        ($at:literal $(, ($lo:literal, $hi:literal, $r:tt))+) => {
            concat!(dw5_load_a!($at), $(dw5_macs_a!($lo, $hi, $r),)+ dw5_load_b!(), $(dw5_macs_b!($lo, $hi, $r),)+)
        };
    }

    /// The multiply-adds of one block, per kernel side, vertical stride and
    /// row count: input row `i` times kernel row `i` into the first output
    /// row's sums (q12-q13) and, with two rows, kernel row `i - SH` into the
    /// second's (q14-q15). One row reads kernel rows `0..k` whatever the stride.
    macro_rules! macs_text {
        (5, 1, true) => {
            concat!(
                dw5_row!(0, (12, 13, 0)),
                dw5_row!(4, (12, 13, 1), (14, 15, 0)),
                dw5_row!(8, (12, 13, 2), (14, 15, 1)),
                dw5_row!(12, (12, 13, 3), (14, 15, 2)),
                dw5_row!(16, (12, 13, 4), (14, 15, 3)),
                dw5_row!(20, (14, 15, 4)),
            )
        };
        (5, 2, true) => {
            concat!(
                dw5_row!(0, (12, 13, 0)),
                dw5_row!(4, (12, 13, 1)),
                dw5_row!(8, (12, 13, 2), (14, 15, 0)),
                dw5_row!(12, (12, 13, 3), (14, 15, 1)),
                dw5_row!(16, (12, 13, 4), (14, 15, 2)),
                dw5_row!(20, (14, 15, 3)),
                dw5_row!(24, (14, 15, 4)),
            )
        };
        (5, 1, false) => {
            concat!(
                dw5_row!(0, (12, 13, 0)),
                dw5_row!(4, (12, 13, 1)),
                dw5_row!(8, (12, 13, 2)),
                dw5_row!(12, (12, 13, 3)),
                dw5_row!(16, (12, 13, 4)),
            )
        };
        (3, 1, true) => {
            concat!(
                dw_load!(0),
                dw_macs!(12, 13, 0),
                dw_load!(4),
                dw_macs!(12, 13, 1),
                dw_macs!(14, 15, 0),
                dw_load!(8),
                dw_macs!(12, 13, 2),
                dw_macs!(14, 15, 1),
                dw_load!(12),
                dw_macs!(14, 15, 2),
            )
        };
        (3, 2, true) => {
            concat!(
                dw_load!(0),
                dw_macs!(12, 13, 0),
                dw_load!(4),
                dw_macs!(12, 13, 1),
                dw_load!(8),
                dw_macs!(12, 13, 2),
                dw_macs!(14, 15, 0),
                dw_load!(12),
                dw_macs!(14, 15, 1),
                dw_load!(16),
                dw_macs!(14, 15, 2),
            )
        };
        (3, 1, false) => {
            concat!(
                dw_load!(0),
                dw_macs!(12, 13, 0),
                dw_load!(4),
                dw_macs!(12, 13, 1),
                dw_load!(8),
                dw_macs!(12, 13, 2)
            )
        };
    }

    /// The block's requantization: each sum `* m + b` (fused), clamped to the
    /// index bounds, rounded by `ROUND_MAGIC` ([`Requant::index`]: the clamp
    /// before the rounding gives the same index, as both bounds are whole),
    /// narrowed to bytes and stored at `o0` and `o1`.
    macro_rules! requant_text {
        () => {
            concat!(
                "vld1.32 {{d6[], d7[]}}, [{c}]!\n",
                "vld1.32 {{d8[], d9[]}}, [{c}]!\n",
                "vld1.32 {{d10[], d11[]}}, [{c}]!\n",
                "vld1.32 {{d12[], d13[]}}, [{c}]!\n",
                "vld1.32 {{d14[], d15[]}}, [{c}]\n",
                "vcvt.f32.s32 q12, q12\n",
                "vcvt.f32.s32 q13, q13\n",
                "vcvt.f32.s32 q14, q14\n",
                "vcvt.f32.s32 q15, q15\n",
                "vmov q8, q4\n",
                "vmov q9, q4\n",
                "vmov q10, q4\n",
                "vmov q11, q4\n",
                "vfma.f32 q8, q12, q3\n",
                "vfma.f32 q9, q13, q3\n",
                "vfma.f32 q10, q14, q3\n",
                "vfma.f32 q11, q15, q3\n",
                "vmax.f32 q8, q8, q5\n",
                "vmax.f32 q9, q9, q5\n",
                "vmax.f32 q10, q10, q5\n",
                "vmax.f32 q11, q11, q5\n",
                "vmin.f32 q8, q8, q6\n",
                "vmin.f32 q9, q9, q6\n",
                "vmin.f32 q10, q10, q6\n",
                "vmin.f32 q11, q11, q6\n",
                "vadd.f32 q8, q8, q7\n",
                "vadd.f32 q9, q9, q7\n",
                "vadd.f32 q10, q10, q7\n",
                "vadd.f32 q11, q11, q7\n",
                "vsub.i32 q8, q8, q7\n",
                "vsub.i32 q9, q9, q7\n",
                "vsub.i32 q10, q10, q7\n",
                "vsub.i32 q11, q11, q7\n",
                "vmovn.i32 d16, q8\n",
                "vmovn.i32 d17, q9\n",
                "vmovn.i32 d18, q10\n",
                "vmovn.i32 d19, q11\n",
                "vmovn.i16 d16, q8\n",
                "vmovn.i16 d17, q9\n",
                "vst1.8 {{d16}}, [{o0}]\n",
                "vst1.8 {{d17}}, [{o1}]\n",
            )
        };
    }

    /// The weights of a `$k`x`$k` kernel from `w` into d0-d2 (3x3) or d0-d6 (5x5).
    macro_rules! weights_text {
        (3) => {
            "vld1.16 {{d0, d1, d2}}, [{w}]\n"
        };
        (5) => {
            concat!("vld1.16 {{d0, d1, d2, d3}}, [{w}]!\n", "vld1.16 {{d4, d5, d6}}, [{w}]\n")
        };
    }

    /// One block: weights from `w` (`WTS` i16, zero past the kernel's),
    /// sums of the rows, requantized with the constants at `c` ([`Consts`]).
    macro_rules! block {
        ($k:tt, $sh:tt, $two:tt, $w:expr, $rows:expr, $col:expr, $t1:expr, $u:expr, $c:expr, $o0:expr, $o1:expr) => {
            asm!(
                ".fpu neon-vfpv4\n",
                weights_text!($k),
                "vmov.i32 q12, #0\n",
                "vmov.i32 q13, #0\n",
                "vmov.i32 q14, #0\n",
                "vmov.i32 q15, #0\n",
                macs_text!($k, $sh, $two),
                requant_text!(),
                w = inout(reg) $w => _,
                rows = in(reg) $rows,
                col = in(reg) $col,
                t1 = in(reg) $t1,
                u = in(reg) $u,
                c = inout(reg) $c => _,
                o0 = in(reg) $o0,
                o1 = in(reg) $o1,
                p = out(reg) _,
                out("d0") _, out("d1") _, out("d2") _, out("d3") _, out("d4") _, out("d5") _, out("d6") _, out("d7") _,
                out("d8") _, out("d9") _, out("d10") _, out("d11") _, out("d12") _, out("d13") _, out("d14") _, out("d15") _,
                options(nostack),
            )
        };
    }

    /// A channel's requantization as the blocks load it: `m`, `b`, the
    /// lowest and highest index as f32, `ROUND_MAGIC`.
    #[repr(C)]
    struct Consts([f32; 5]);

    /// Channels `first..` of the indices `x` into `out`, through planes kept
    /// by the thread between inferences; without an output pair, on the
    /// reference loops.
    pub(in crate::engine) fn run<U: IndexOut>(op: &Depthwise, iw: &IntDw, x: &[u8], out: &mut [U], first: usize) {
        let Some(req) = iw.req.as_ref() else {
            return super::run_plain(op, iw, x, out, first);
        };
        thread_local! {
            static PLANES: std::cell::RefCell<Vec<i16>> = const { std::cell::RefCell::new(Vec::new()) };
        }
        PLANES.with_borrow_mut(|planes| {
            planes.clear();
            planes.resize(op.planes_len(), 0);
            // SAFETY: the op only has integer weights on this target when
            // the CPU has NEON and VFPv4 (`Depthwise::reading_indices`);
            // the loops' reads and writes are inside `planes`, `x` and
            // `out` (checked at their entry).
            unsafe {
                match (op.k, op.strides[0]) {
                    (3, 2) => channels::<U, 2, 3>(op, iw, req, x, out, first, planes),
                    (3, _) => channels::<U, 1, 3>(op, iw, req, x, out, first, planes),
                    (_, 2) => channels::<U, 2, 5>(op, iw, req, x, out, first, planes),
                    (_, _) => channels::<U, 1, 5>(op, iw, req, x, out, first, planes),
                }
            }
        })
    }

    /// Copies one input row of indices into the planes as `n - zero`:
    /// columns `col` of the padded row to phase `col % sw` at `col / sw`
    /// (`at` holds where source columns 0 and 1 go), 16 at a time.
    fn fill_row(src: &[u8], planes: &mut [i16], at: [usize; 2], sw: usize, zero: u8) {
        let w = src.len();
        let (evens, odds) = if sw == 1 { (w, 0) } else { (w.div_ceil(2), w / 2) };
        assert!(at[0] + evens <= planes.len() && at[1] + odds <= planes.len());
        let mut i = 0;
        while i + 16 <= w {
            // SAFETY: NEON as for the blocks (`run`); 16 bytes read from
            // `src`, 16 (stride 1) or 8 + 8 (stride 2) values written within
            // the bounds checked above.
            unsafe {
                let s = src.as_ptr().add(i);
                if sw == 1 {
                    let d = planes.as_mut_ptr().add(at[0] + i);
                    asm!(
                        ".fpu neon",
                        "vdup.8 d4, {z}",
                        "vld1.8 {{d0, d1}}, [{s}]",
                        "vsubl.u8 q8, d0, d4",
                        "vsubl.u8 q9, d1, d4",
                        "vst1.16 {{d16-d19}}, [{d}]",
                        z = in(reg) zero as u32, s = in(reg) s, d = in(reg) d,
                        out("d0") _, out("d1") _, out("d4") _,
                        options(nostack),
                    );
                } else {
                    let (d0, d1) = (planes.as_mut_ptr().add(at[0] + i / 2), planes.as_mut_ptr().add(at[1] + i / 2));
                    asm!(
                        ".fpu neon",
                        "vdup.8 d4, {z}",
                        "vld2.8 {{d0, d1}}, [{s}]",
                        "vsubl.u8 q8, d0, d4",
                        "vsubl.u8 q9, d1, d4",
                        "vst1.16 {{d16, d17}}, [{d0}]",
                        "vst1.16 {{d18, d19}}, [{d1}]",
                        z = in(reg) zero as u32, s = in(reg) s, d0 = in(reg) d0, d1 = in(reg) d1,
                        out("d0") _, out("d1") _, out("d4") _,
                        options(nostack),
                    );
                }
            }
            i += 16;
        }
        for (j, &v) in src.iter().enumerate().skip(i) {
            // Shifts, not divisions: this target divides in a library call.
            let to = if sw == 1 {
                at[0] + j
            } else if j % 2 == 0 {
                at[0] + j / 2
            } else {
                at[1] + j / 2
            };
            planes[to] = v as i16 - zero as i16;
        }
    }

    /// The channel loop: fill the planes (`n - zero`, each column to its
    /// phase), then two output rows at a time in blocks of 8.
    unsafe fn channels<U: IndexOut, const SH: usize, const K: usize>(
        op: &Depthwise,
        iw: &IntDw,
        req: &Requant,
        x: &[u8],
        out: &mut [U],
        first: usize,
        planes: &mut [i16],
    ) {
        let [h, w] = op.in_hw;
        let [ho, wo] = op.out_hw();
        let sw = op.strides[1];
        let (hp, row_len, wo_blocks) = op.layout();
        let phase = hp * row_len;
        let channels = out.len() / (ho * wo);
        assert!(wo_blocks % LANES == 0 && planes.len() >= op.planes_len() && op.k == K && iw.taps == K * K);
        assert!(x.len() >= (first + channels) * h * w && first + channels <= op.channels);
        // Taps 1 and 2 of a row, in bytes from tap 0: the second as a step
        // from the first (post-increments). Further taps (5x5) alternate
        // the same two steps.
        let taps_at: [usize; 3] = std::array::from_fn(|dx| (dx % sw) * phase + dx / sw);
        let t1 = 2 * taps_at[1];
        let u = (2 * taps_at[2]).wrapping_sub(t1);
        let col_at = |j: usize| ((op.pad[1] + j) % sw) * phase + (op.pad[1] + j) / sw;
        let cols = [col_at(0), col_at(1.min(w - 1))];
        let index = std::mem::size_of::<U>() == 1;
        let mut spare = [[0u8; LANES]; 2];
        for (ix, out) in out.chunks_exact_mut(ho * wo).enumerate() {
            let c = first + ix;
            let src = &x[c * h * w..][..h * w];
            for (y, row) in src.chunks_exact(w).enumerate() {
                let base = (y + op.pad[0]) * row_len;
                fill_row(row, planes, cols.map(|c| base + c), sw, iw.zero);
            }
            let mut wts = [0i16; WTS];
            wts[..K * K].copy_from_slice(iw.weights(c));
            let consts = Consts([req.m[c], req.b[c], req.ilo as f32, req.ihi as f32, ROUND_MAGIC]);
            let out = out.as_mut_ptr();
            let (last, n) = (wo.saturating_sub(LANES), wo.min(LANES));
            for pair in 0..ho.div_ceil(2) {
                let first_row = 2 * pair * SH;
                let two = 2 * pair + 1 < ho;
                let rows: [*const i16; KMAX + 2] = std::array::from_fn(|i| {
                    let i = if first_row + i < hp && i < K + SH { i } else { 0 };
                    planes.as_ptr().add((first_row + i) * row_len)
                });
                // Whole blocks only, the last one ending at the row's end (as
                // on aarch64); rows shorter than a block go through `spare`.
                let mut col = 0;
                loop {
                    let col_at = col.min(last);
                    let dst = [out.add(2 * pair * wo + col_at), out.add((2 * pair + 1).min(ho - 1) * wo + col_at)];
                    let direct = index && n == LANES;
                    let o: [*mut u8; 2] = if direct {
                        [dst[0] as *mut u8, if two { dst[1] as *mut u8 } else { spare[1].as_mut_ptr() }]
                    } else {
                        [spare[0].as_mut_ptr(), spare[1].as_mut_ptr()]
                    };
                    let (w_ptr, r_ptr, cb, cp) = (wts.as_ptr(), rows.as_ptr(), 2 * col_at, consts.0.as_ptr());
                    // One row reads kernel rows `0..K` whatever the stride.
                    match (K, SH, two) {
                        (3, 1, true) => block!(3, 1, true, w_ptr, r_ptr, cb, t1, u, cp, o[0], o[1]),
                        (3, _, true) => block!(3, 2, true, w_ptr, r_ptr, cb, t1, u, cp, o[0], o[1]),
                        (3, _, false) => block!(3, 1, false, w_ptr, r_ptr, cb, t1, u, cp, o[0], o[1]),
                        (_, 1, true) => block!(5, 1, true, w_ptr, r_ptr, cb, t1, u, cp, o[0], o[1]),
                        (_, _, true) => block!(5, 2, true, w_ptr, r_ptr, cb, t1, u, cp, o[0], o[1]),
                        (_, _, false) => block!(5, 1, false, w_ptr, r_ptr, cb, t1, u, cp, o[0], o[1]),
                    }
                    if !direct {
                        for (r, idx) in spare.iter().enumerate().take(if two { 2 } else { 1 }) {
                            for (k, &i) in idx.iter().enumerate().take(n) {
                                *dst[r].add(k) = U::from_index(i, req.lo, req.scale);
                            }
                        }
                    }
                    if col_at == last {
                        break;
                    }
                    col += LANES;
                }
            }
        }
    }
}

#[cfg(target_arch = "aarch64")]
pub(super) mod dot {
    //! The loops for cores with the dot product (Cortex-A55, A76: Pi 5):
    //! each input row's bytes are kept as signed bytes (`n - 128`), `tbl`
    //! gathers the three taps of each of 8 outputs into four-byte groups
    //! (a zero weight for the fourth), and one `sdot` per four outputs adds
    //! a kernel row: 3 per 4 outputs where `smlal` needs 9.

    use std::arch::aarch64::*;
    use std::arch::asm;

    use super::neon::{store, ReqRegs};
    use super::{Depthwise, IndexOut, IntDw};
    use crate::engine::int8_conv::neon::Regs;

    /// Outputs per block: two registers of four sums.
    const LANES: usize = 8;
    /// Bytes read per input row and block: two registers.
    const READ: usize = 32;

    /// `acc += a . b`, four bytes per lane.
    macro_rules! sdot {
        ($acc:expr, $a:expr, $b:expr) => {
            asm!(
                "sdot {acc:v}.4s, {a:v}.16b, {b:v}.16b",
                acc = inout(vreg) $acc,
                a = in(vreg) $a,
                b = in(vreg) $b,
                options(pure, nomem, nostack, preserves_flags)
            )
        };
    }

    /// Padded rows: height, and the length of a row (room for the last
    /// block's 32-byte reads).
    fn layout(op: &Depthwise) -> (usize, usize) {
        let hp = op.in_hw[0] + op.pad[0] + op.pad[2];
        let wp = op.in_hw[1] + op.pad[1] + op.pad[3];
        let wo = op.out_hw()[1];
        (hp, (wp.max(wo.max(LANES) * op.strides[1]) + READ).next_multiple_of(16))
    }

    /// Channels `first..` of the indices `x` into `out`, through a plane
    /// kept by the thread between inferences.
    ///
    /// # Safety
    /// The CPU must have the dot product.
    pub(in crate::engine) unsafe fn run<U: IndexOut>(
        op: &Depthwise,
        iw: &IntDw,
        x: &[u8],
        out: &mut [U],
        first: usize,
    ) {
        thread_local! {
            static PLANE: std::cell::RefCell<Vec<u8>> = const { std::cell::RefCell::new(Vec::new()) };
        }
        assert_eq!(op.k, 3, "the SDOT loops gather 3 taps a row");
        let (hp, row_len) = layout(op);
        PLANE.with_borrow_mut(|plane| {
            // Padding holds the value 0: the index `zero`, as a signed byte.
            plane.clear();
            plane.resize(hp * row_len + READ, iw.zero ^ 0x80);
            let p = plane.as_mut_slice();
            by_variant!(channels, [], op, iw, x, out, first, p)
        })
    }

    /// The `tbl` indices of outputs 0-3 and 4-7 of a block: output `j`'s
    /// taps at `j * sw`, `+1`, `+2`, then an index past the table (a 0).
    fn gather(sw: usize) -> [[u8; 16]; 2] {
        std::array::from_fn(|half| {
            std::array::from_fn(|i| {
                let (j, t) = (4 * half + i / 4, i % 4);
                if t == 3 {
                    0xff
                } else {
                    (j * sw + t) as u8
                }
            })
        })
    }

    #[target_feature(enable = "neon,dotprod")]
    unsafe fn channels<U: IndexOut, const REQ: bool, const CLAMP: bool, const QDQ: bool, const SH: usize>(
        op: &Depthwise,
        iw: &IntDw,
        x: &[u8],
        out: &mut [U],
        first: usize,
        plane: &mut [u8],
    ) {
        let [h, w] = op.in_hw;
        let [ho, wo] = op.out_hw();
        let sw = op.strides[1];
        let (hp, row_len) = layout(op);
        let channels = out.len() / (ho * wo);
        assert!(plane.len() >= hp * row_len + READ);
        assert!(x.len() >= (first + channels) * h * w && first + channels <= op.channels);
        let regs = Regs::new(&op.epi);
        let req = ReqRegs::new(iw.req.as_ref());
        let idx = gather(sw).map(|g| vld1q_u8(g.as_ptr()));
        let flip = vdupq_n_u8(0x80);
        for (ix, out) in out.chunks_exact_mut(ho * wo).enumerate() {
            let c = first + ix;
            let src = &x[c * h * w..][..h * w];
            // The rows by pointer, `w` apart in the input and `row_len` in
            // the plane (its rows have room for 8 bytes: `layout`).
            let first_at = op.pad[0] * row_len + op.pad[1];
            assert!(first_at + (h - 1) * row_len + w.max(8) <= plane.len());
            let (s0, d0) = (src.as_ptr(), plane.as_mut_ptr().add(first_at));
            let f8 = vget_low_u8(flip);
            for y in 0..h {
                let (s, d) = (s0.add(y * w), d0.add(y * row_len));
                if w >= 16 {
                    // By 16, the last 16 overlapping what is done.
                    let mut i = 0;
                    while i + 16 < w {
                        vst1q_u8(d.add(i), veorq_u8(vld1q_u8(s.add(i)), flip));
                        i += 16;
                    }
                    vst1q_u8(d.add(w - 16), veorq_u8(vld1q_u8(s.add(w - 16)), flip));
                } else if w >= 8 {
                    vst1_u8(d, veor_u8(vld1_u8(s), f8));
                    vst1_u8(d.add(w - 8), veor_u8(vld1_u8(s.add(w - 8)), f8));
                } else if c * h * w + y * w + 8 <= x.len() {
                    // Rows of fewer than 8 (7x7 layers): 8 bytes read where
                    // the input goes on that far (from `x`, checked here),
                    // the ones past the row replaced by the padding's value;
                    // they land on padding or slack.
                    let keep = vcgt_u8(vdup_n_u8(w as u8), vcreate_u8(0x0706_0504_0302_0100));
                    let b = veor_u8(vld1_u8(x.as_ptr().add(c * h * w + y * w)), f8);
                    vst1_u8(d, vbsl_u8(keep, b, vdup_n_u8(iw.zero ^ 0x80)));
                } else {
                    for i in 0..w {
                        *d.add(i) = *s.add(i) ^ 0x80;
                    }
                }
            }
            let q: &[i16; 9] = iw.weights(c).try_into().expect("nine weights per channel");
            // Kernel row k as four-byte groups (its three weights, then 0).
            let k: [int8x16_t; 3] = std::array::from_fn(|r| {
                let g: [i8; 16] = std::array::from_fn(|i| if i % 4 == 3 { 0 } else { q[3 * r + i % 4] as i8 });
                vld1q_s8(g.as_ptr())
            });
            // The signed bytes count from 128 below the indices, and the
            // padding (and every tap) from `zero`: sum(q * (s + 128 - zero)).
            let corr = vdupq_n_s32((128 - iw.zero as i32) * q.iter().map(|&v| v as i32).sum::<i32>());
            let (mul, bias) = match &iw.req {
                Some(r) if REQ => (vdupq_n_f32(r.m[c]), vdupq_n_f32(r.b[c])),
                _ => (vdupq_n_f32(iw.mul[c]), vdupq_n_f32(op.bias[c])),
            };
            let out = out.as_mut_ptr();
            let (last, n) = (wo.saturating_sub(LANES), wo.min(LANES));
            for pair in 0..ho.div_ceil(2) {
                let first_row = 2 * pair * SH;
                let two = 2 * pair + 1 < ho;
                let rows: [*const i8; 5] = std::array::from_fn(|i| {
                    let i = if first_row + i < hp { i } else { 0 };
                    plane.as_ptr().add((first_row + i) * row_len) as *const i8
                });
                let dst = out.add(2 * pair * wo);
                // As the 16-bit loops: whole blocks, the last one ending at
                // the row's end; rows shorter than a block stored in part.
                let mut col = 0;
                loop {
                    let col_at = col.min(last);
                    let mut acc = [[corr; 2]; 2];
                    let used = if two { SH + 3 } else { 3 };
                    for (i, row) in rows.iter().enumerate().take(used) {
                        let p = row.add(col_at * sw);
                        let t = int8x16x2_t(vld1q_s8(p), vld1q_s8(p.add(16)));
                        let (g0, g1) = (vqtbl2q_s8(t, idx[0]), vqtbl2q_s8(t, idx[1]));
                        if i < 3 {
                            sdot!(acc[0][0], g0, k[i]);
                            sdot!(acc[0][1], g1, k[i]);
                        }
                        if two && i >= SH {
                            sdot!(acc[1][0], g0, k[i - SH]);
                            sdot!(acc[1][1], g1, k[i - SH]);
                        }
                    }
                    store::<U, REQ, CLAMP, QDQ>(&regs, &req, acc[0], mul, bias, dst.add(col_at), n);
                    if two {
                        store::<U, REQ, CLAMP, QDQ>(&regs, &req, acc[1], mul, bias, dst.add(wo + col_at), n);
                    }
                    if col_at == last {
                        break;
                    }
                    col += LANES;
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::depthwise::tests::values;
    use tract_core::internal::tvec;

    /// A depthwise operator reading indices on `grid`, with int8-step
    /// weights, and its integer form.
    #[allow(clippy::too_many_arguments)]
    fn op(
        c: usize,
        k: usize,
        hw: [usize; 2],
        strides: [usize; 2],
        pad: [usize; 4],
        epi: Epilogue,
        grid: QuantDequant,
    ) -> Depthwise {
        let out_hw = [(hw[0] + pad[0] + pad[2] - k) / strides[0] + 1, (hw[1] + pad[1] + pad[3] - k) / strides[1] + 1];
        // Per-channel steps, each channel with a weight of +-127 (how
        // symmetric quantizers scale them), the rest anywhere in between.
        let taps = k * k;
        let mut weights: Vec<f32> = values(c * taps, 7).iter().map(|v| (v * 127.0).round()).collect();
        for (ch, row) in weights.chunks_exact_mut(taps).enumerate() {
            row[ch % taps] = if ch % 2 == 0 { 127.0 } else { -127.0 };
            let step = 0.01 + ch as f32 * 0.003;
            row.iter_mut().for_each(|w| *w *= step);
        }
        let bias: Vec<f32> = values(c, 11).iter().map(|v| v * 0.5).collect();
        let mut op = Depthwise {
            channels: c,
            k,
            in_hw: hw,
            strides,
            pad,
            weights: weights.into(),
            bias: bias.into(),
            epi,
            input_u8: Some(grid),
            out_u8: false,
            int: None,
            out_shape: tvec![1, c, out_hw[0], out_hw[1]],
        };
        op.int = IntDw::new(k, &op.weights, &op.bias, &op.epi, grid);
        assert!(op.int.is_some(), "the test's weights are whole steps");
        op
    }

    fn indices(n: usize, seed: u32) -> Vec<u8> {
        values(n, seed).iter().map(|v| ((v + 1.0) * 127.9) as u8).collect()
    }

    const RELU6_PAIR: Epilogue =
        Epilogue { clamp: (0.0, 6.0), qdq: Some(QuantDequant { scale: 0.05, inv_scale: 20.0, lo: 0.0, hi: 255.0 }) };

    fn epilogues() -> Vec<Epilogue> {
        let pair = QuantDequant::new(0.031, -128.0, 127.0);
        vec![
            Epilogue::NONE,
            Epilogue { clamp: (0.0, 6.0), qdq: None },
            Epilogue { clamp: Epilogue::NONE.clamp, qdq: Some(pair) },
            RELU6_PAIR,
            // A clip narrower than the grid on both sides.
            Epilogue { clamp: (-1.0, 2.0), qdq: Some(pair) },
        ]
    }

    #[test]
    fn integer_sums_match_the_float_operator() {
        let grids = [
            QuantDequant::new(0.02, 0.0, 255.0),
            QuantDequant::new(0.015, -128.0, 127.0),
            QuantDequant::new(0.01, -37.0, 218.0),
        ];
        for grid in grids {
            for epi in epilogues() {
                let shapes = [
                    (3, [1, 1], [1, 1, 1, 1]),
                    (3, [2, 2], [0, 0, 1, 1]),
                    (3, [2, 2], [1, 1, 1, 1]),
                    (5, [1, 1], [2, 2, 2, 2]),
                    (5, [2, 2], [1, 1, 2, 2]),
                ];
                for (k, strides, pad) in shapes {
                    let op = op(5, k, [9, 13], strides, pad, epi, grid);
                    let iw = op.int.clone().expect("integer form");
                    let x = indices(5 * 9 * 13, 3);
                    let n: usize = op.out_shape.iter().product();
                    let (mut int, mut float) = (vec![0f32; n], vec![0f32; n]);
                    run_plain(&op, &iw, &x, &mut int, 0);
                    op.run_all::<u8, f32>(&x, &mut float).unwrap();
                    // One output step (with a pair) or float rounding apart.
                    let tol = epi.qdq.map_or(1e-4, |q| q.scale * 1.01);
                    for (i, (a, b)) in int.iter().zip(&float).enumerate() {
                        assert!(
                            (a - b).abs() <= tol * b.abs().max(1.0),
                            "{grid:?} {epi:?} {strides:?} at {i}: {a} vs {b}"
                        );
                    }
                    // And the indices equal the pair's index of the value.
                    if let Some(qd) = epi.qdq {
                        let mut idx = vec![0u8; n];
                        run_plain(&op, &iw, &x, &mut idx, 0);
                        for (i, v) in idx.iter().zip(&int) {
                            assert_eq!(QuantDequant::one(&qd, *v), (*i as f32 + qd.lo) * qd.scale);
                        }
                    }
                }
            }
        }
    }

    #[test]
    fn padding_reads_the_value_zero_and_a_grid_without_zero_is_refused() {
        // All inputs at the grid's zero: every output is the bias alone.
        let grid = QuantDequant::new(0.02, -100.0, 155.0);
        let op = op(2, 3, [4, 4], [1, 1], [1, 1, 1, 1], Epilogue::NONE, grid);
        let iw = op.int.clone().unwrap();
        let mut out = vec![0f32; 2 * 16];
        run_plain(&op, &iw, &[100u8; 32], &mut out, 0);
        assert!(out[..16].iter().all(|&v| v == op.bias[0]) && out[16..].iter().all(|&v| v == op.bias[1]));
        // A grid whose range leaves out 0 cannot pad.
        assert!(IntDw::new(3, &op.weights, &op.bias, &op.epi, QuantDequant::new(0.02, 3.0, 258.0)).is_none());
        // Weights off any int8 grid stay on the float loops.
        let mut w = op.weights.to_vec();
        w[1] += 0.000_37;
        assert!(IntDw::new(3, &w, &op.bias, &op.epi, grid).is_none());
    }

    /// Every geometry the vector loops special-case: short, ragged and
    /// exact-block rows, odd heights, both strides on each axis, padding on
    /// any side, a channel range that starts anywhere (a thread's share).
    /// A vector variant's name and its loops for byte and f32 outputs.
    type Variant = (&'static str, Loops<u8>, Loops<f32>);
    type Loops<U> = fn(&Depthwise, &IntDw, &[u8], &mut [U], usize);

    #[test]
    fn vector_loops_match_the_reference_bit_for_bit() {
        if !cfg!(any(target_arch = "aarch64", target_arch = "arm")) {
            println!(
                "SKIPPED: the integer depthwise loops are ARM NEON; this {} host runs only the reference",
                std::env::consts::ARCH
            );
            return;
        }
        let grid = QuantDequant::new(0.02, -3.0, 252.0);
        // Each variant this CPU has: the 16-bit loops on every aarch64
        // core, the SDOT ones with the dot product.
        #[cfg(target_arch = "aarch64")]
        let variants: Vec<Variant> = {
            let mut v: Vec<Variant> = vec![("smlal", neon::run::<u8>, neon::run::<f32>)];
            if std::arch::is_aarch64_feature_detected!("dotprod") {
                // SAFETY: the CPU has the dot product.
                v.push((
                    "sdot",
                    |o, i, x, out, f| unsafe { dot::run::<u8>(o, i, x, out, f) },
                    |o, i, x, out, f| unsafe { dot::run::<f32>(o, i, x, out, f) },
                ));
            } else {
                println!("SKIPPED: the SDOT depthwise loops: this CPU has no dot product (run under qemu -cpu cortex-a76 for them)");
            }
            v
        };
        #[cfg(target_arch = "arm")]
        let variants: Vec<Variant> = if crate::engine::isa::Isa::Neon.cpu_has() {
            vec![("vmlal", arm32::run::<u8>, arm32::run::<f32>)]
        } else {
            println!("SKIPPED: the VMLAL depthwise loops: this CPU has no NEON with VFPv4");
            vec![]
        };
        #[cfg(not(any(target_arch = "aarch64", target_arch = "arm")))]
        let variants: Vec<Variant> = vec![];
        let mut cases = 0;
        let pads = |k: usize| match k {
            3 => [[1, 1, 1, 1], [0, 0, 1, 1], [0, 1, 0, 0], [0, 0, 0, 0]],
            _ => [[2, 2, 2, 2], [1, 1, 2, 2], [0, 2, 0, 1], [0, 0, 0, 0]],
        };
        for (k, epi) in [3, 5].into_iter().flat_map(|k| epilogues().into_iter().map(move |e| (k, e))) {
            for strides in [[1, 1], [2, 2], [1, 2], [2, 1]] {
                for pad in pads(k) {
                    for hw in [[3, 3], [4, 7], [7, 8], [5, 9], [6, 16], [9, 17], [8, 33], [3, 40], [2, 56]] {
                        if hw[0] + pad[0] + pad[2] < k || hw[1] + pad[1] + pad[3] < k {
                            continue;
                        }
                        let op = op(4, k, hw, strides, pad, epi, grid);
                        let iw = op.int.clone().unwrap();
                        let x = indices(4 * hw[0] * hw[1], cases as u32);
                        let plane = op.out_shape[2] * op.out_shape[3];
                        for first in [0, 1] {
                            let n = (4 - first) * plane;
                            for (name, bytes, floats) in &variants {
                                if k != 3 && *name == "sdot" {
                                    continue; // `run` takes 5x5 kernels to `smlal`
                                }
                                let (mut want, mut got) = (vec![0u8; n], vec![7u8; n]);
                                run_plain(&op, &iw, &x, &mut want, first);
                                bytes(&op, &iw, &x, &mut got, first);
                                if epi.qdq.is_some() {
                                    assert_eq!(
                                        got, want,
                                        "{name} {k}x{k} {epi:?} {strides:?} {pad:?} {hw:?} from {first}"
                                    );
                                }
                                let (mut want, mut got) = (vec![0f32; n], vec![7f32; n]);
                                run_plain(&op, &iw, &x, &mut want, first);
                                floats(&op, &iw, &x, &mut got, first);
                                let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
                                assert_eq!(
                                    bits(&got),
                                    bits(&want),
                                    "{name} {k}x{k} {epi:?} {strides:?} {pad:?} {hw:?} from {first}"
                                );
                                cases += 1;
                            }
                        }
                    }
                }
            }
        }
        println!("{cases} cases bit for bit");
    }
}
