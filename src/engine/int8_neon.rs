//! The aarch64 block loops of [`Int8Conv`]: SDOT on the packed quads for
//! cores with the dot product (Cortex-A55, A76: Pi 5), and SMLAL on the
//! quads widened to 16 bits for those without (Cortex-A53, A72: Pi 3, Pi 4).
//!
//! Both sum blocks of 8 output channels by 8 pixels in 16 registers of four
//! 32-bit sums, starting from the zero correction, and hand each row of 8
//! sums to the same epilogue as the scalar reference, so every variant
//! stores the same bits.
//!
//! SDOT multiplies signed bytes, while the packed indices are unsigned
//! (0..=255 counted from the grid's low end): [`to_signed`] flips their top
//! bit, which makes each `n - 128`, and the correction counts from
//! `lo + 128` instead ([`Int8Conv::signed_corr`]). The widened form keeps the
//! unsigned indices: a byte fits in an i16 either way.
//!
//! There is no stable intrinsic for SDOT yet, so it is one instruction of
//! inline assembly, in a function compiled with the `dotprod` feature.

use std::arch::aarch64::*;
use std::arch::asm;

use super::super::epilogue::Epilogue;
use super::super::quant_dequant::ROUND_MAGIC;
use super::{Int8Conv, Out, MR, NR, PX};

/// Flips each packed byte's top bit: index `n` becomes the signed byte `n - 128`.
pub(super) fn to_signed(packed: &mut [u32]) {
    for w in packed {
        *w ^= 0x8080_8080;
    }
}

/// Widens the packed quads (runs of `NR` pixels' words per quad, byte `j`
/// of a word being channel `4 * quad + j`) to one i16 row of `NR` pixels per
/// channel, blocks in the same order: what the SMLAL loop reads.
pub(super) fn widen(packed: &[u32], wide: &mut Vec<i16>) {
    wide.clear();
    wide.resize(packed.len() * 4, 0);
    for (words, rows) in packed.chunks_exact(NR).zip(wide.chunks_exact_mut(4 * NR)) {
        let (r0, rest) = rows.split_at_mut(NR);
        let (r1, rest) = rest.split_at_mut(NR);
        let (r2, r3) = rest.split_at_mut(NR);
        for (i, &w) in words.iter().enumerate() {
            r0[i] = (w & 0xff) as i16;
            r1[i] = (w >> 8 & 0xff) as i16;
            r2[i] = (w >> 16 & 0xff) as i16;
            r3[i] = (w >> 24) as i16;
        }
    }
}

/// `v`'s indices on the op's input grid, four lanes: [`Int8Conv::grid_index`]'s
/// arithmetic, the rounded value's pattern minus that of the grid's low end.
#[inline(always)]
unsafe fn indices(v: float32x4_t, inv: float32x4_t, lo: float32x4_t, hi: float32x4_t, base: uint32x4_t) -> uint32x4_t {
    let q = vminq_f32(vmaxq_f32(vmulq_f32(v, inv), lo), hi);
    vsubq_u32(vreinterpretq_u32_f32(vaddq_f32(q, vdupq_n_f32(ROUND_MAGIC))), base)
}

/// 16 input values from `src` (fewer at the end of a row: `valid`) as their
/// indices on the op's input grid, one byte each.
#[inline(always)]
unsafe fn row_bytes(src: &[f32], valid: usize, consts: &GridRegs) -> uint8x16_t {
    let mut tail = [0f32; 16];
    let ptr = if valid == 16 {
        src.as_ptr()
    } else {
        tail[..valid].copy_from_slice(&src[..valid]);
        tail.as_ptr()
    };
    let GridRegs { inv, lo, hi, base } = *consts;
    let n: [uint32x4_t; 4] = std::array::from_fn(|i| indices(vld1q_f32(ptr.add(4 * i)), inv, lo, hi, base));
    let h0 = vcombine_u16(vmovn_u32(n[0]), vmovn_u32(n[1]));
    let h1 = vcombine_u16(vmovn_u32(n[2]), vmovn_u32(n[3]));
    vcombine_u8(vmovn_u16(h0), vmovn_u16(h1))
}

/// 16 input indices from `src` (fewer at the end of a row: `valid`).
#[inline(always)]
unsafe fn row_indices(src: &[u8], valid: usize) -> uint8x16_t {
    if valid == 16 {
        vld1q_u8(src.as_ptr())
    } else {
        let mut tail = [0u8; 16];
        tail[..valid].copy_from_slice(&src[..valid]);
        vld1q_u8(tail.as_ptr())
    }
}

/// The input grid's constants in registers.
#[derive(Clone, Copy)]
struct GridRegs {
    inv: float32x4_t,
    lo: float32x4_t,
    hi: float32x4_t,
    base: uint32x4_t,
}

impl GridRegs {
    fn new(op: &Int8Conv) -> GridRegs {
        let qd = op.input;
        // SAFETY: NEON is the aarch64 baseline.
        unsafe {
            GridRegs {
                inv: vdupq_n_f32(qd.inv_scale),
                lo: vdupq_n_f32(qd.lo),
                hi: vdupq_n_f32(qd.hi),
                base: vdupq_n_u32((qd.lo + ROUND_MAGIC).to_bits()),
            }
        }
    }
}

/// What a 1x1 convolution reads: f32 values on the input grid, or their indices.
#[derive(Clone, Copy)]
pub(super) enum Rows<'a> {
    Values(&'a [f32]),
    Indices(&'a [u8]),
}

impl Rows<'_> {
    /// Pixels `px..px + valid` (at most 16) of input channel `ch` (of `p` pixels) as indices.
    #[inline(always)]
    unsafe fn bytes(self, ch: usize, p: usize, px: usize, valid: usize, grid: &GridRegs) -> uint8x16_t {
        match self {
            Rows::Values(x) => row_bytes(&x[ch * p + px..], valid, grid),
            Rows::Indices(x) => row_indices(&x[ch * p + px..], valid),
        }
    }
}

/// Packs a 1x1 convolution's input as [`Int8Conv::pack_plain`] does, with
/// each byte's top bit flipped ([`to_signed`]): 16 pixels of four channels
/// at a time, interleaved into words by `st4`.
pub(super) fn pack_signed(op: &Int8Conv, x: Rows, packed: &mut [u32]) {
    let (k, p, pp) = (op.in_channels, op.pixels, op.padded_pixels());
    assert!(packed.len() >= op.quads() * pp);
    let grid = GridRegs::new(op);
    // SAFETY: NEON is the aarch64 baseline; every read is of a row's valid
    // pixels (checked slices), every write of 16 words inside `packed`
    // (16 divides NR, so a step's words are consecutive).
    unsafe {
        let flip = vdupq_n_u8(0x80);
        let zero = vdupq_n_u8(0);
        for quad in 0..op.quads() {
            for px in (0..pp).step_by(16) {
                let valid = p.saturating_sub(px).min(16);
                let lane = |j: usize| {
                    let ch = 4 * quad + j;
                    let b = if ch < k && valid > 0 { x.bytes(ch, p, px, valid, &grid) } else { zero };
                    veorq_u8(b, flip)
                };
                let words = uint8x16x4_t(lane(0), lane(1), lane(2), lane(3));
                let at = op.word_at(quad, px);
                assert!(at + 16 <= packed.len());
                vst4q_u8(packed.as_mut_ptr().add(at) as *mut u8, words);
            }
        }
    }
}

/// Packs a 1x1 convolution's input straight into the widened form
/// [`widen`] makes of the packed quads: one i16 row of `NR` pixels per input
/// channel (zero past the channels and the pixels), blocks of `NR` pixels.
pub(super) fn pack_wide(op: &Int8Conv, x: Rows, wide: &mut Vec<i16>) {
    let (k, p, pp, depth) = (op.in_channels, op.pixels, op.padded_pixels(), 4 * op.quads());
    wide.clear();
    wide.resize(depth * pp, 0);
    let grid = GridRegs::new(op);
    for block in 0..pp / NR {
        for ch in 0..k {
            let row = &mut wide[(block * depth + ch) * NR..][..NR];
            for half in 0..NR / 16 {
                let px = block * NR + 16 * half;
                let valid = p.saturating_sub(px).min(16);
                if valid == 0 {
                    break;
                }
                let dst = &mut row[16 * half..][..16];
                // SAFETY: NEON is the aarch64 baseline; `dst` holds 16 values.
                unsafe {
                    let b = x.bytes(ch, p, px, valid, &grid);
                    vst1q_s16(dst.as_mut_ptr(), vreinterpretq_s16_u16(vmovl_u8(vget_low_u8(b))));
                    vst1q_s16(dst.as_mut_ptr().add(8), vreinterpretq_s16_u16(vmovl_high_u8(b)));
                }
            }
        }
    }
}

/// An epilogue's constants in registers.
#[derive(Clone, Copy)]
pub(in crate::engine) struct Regs {
    clo: float32x4_t,
    chi: float32x4_t,
    inv: float32x4_t,
    qlo: float32x4_t,
    qhi: float32x4_t,
    scale: float32x4_t,
    magic: float32x4_t,
    /// The bit pattern of `qlo + magic`: index 0.
    base: uint32x4_t,
}

impl Regs {
    /// `epi`'s clip bounds and pair parameters, broadcast.
    pub(in crate::engine) fn new(epi: &Epilogue) -> Regs {
        let qd = epi.by_value().qd;
        // SAFETY: NEON is the aarch64 baseline.
        unsafe {
            Regs {
                clo: vdupq_n_f32(epi.clamp.0),
                chi: vdupq_n_f32(epi.clamp.1),
                inv: vdupq_n_f32(qd.inv_scale),
                qlo: vdupq_n_f32(qd.lo),
                qhi: vdupq_n_f32(qd.hi),
                scale: vdupq_n_f32(qd.scale),
                magic: vdupq_n_f32(ROUND_MAGIC),
                base: vdupq_n_u32((qd.lo + ROUND_MAGIC).to_bits()),
            }
        }
    }

    /// The clip as `max` then `min` (`fmaxnm`/`fminnm`: a NaN gives the
    /// bound, as `f32::max` does), then the pair on the clipped value, whose
    /// bounds keep a NaN (`fmax`/`fmin`), as `QuantDequant::one`'s
    /// comparisons do: [`super::Applied::apply`]'s arithmetic.
    #[inline(always)]
    pub(super) unsafe fn apply<const CLAMP: bool, const QDQ: bool>(&self, mut v: float32x4_t) -> float32x4_t {
        if CLAMP {
            v = vminnmq_f32(vmaxnmq_f32(v, self.clo), self.chi);
        }
        if QDQ {
            let q = vminq_f32(vmaxq_f32(vmulq_f32(v, self.inv), self.qlo), self.qhi);
            v = vmulq_f32(vsubq_f32(vaddq_f32(q, self.magic), self.magic), self.scale);
        }
        v
    }

    /// The clip, then the pair's index on its grid: [`super::Applied::index`]'s
    /// arithmetic (the low byte of each lane is the index).
    #[inline(always)]
    pub(super) unsafe fn index<const CLAMP: bool>(&self, mut v: float32x4_t) -> uint32x4_t {
        if CLAMP {
            v = vminnmq_f32(vmaxnmq_f32(v, self.clo), self.chi);
        }
        let q = vminq_f32(vmaxq_f32(vmulq_f32(v, self.inv), self.qlo), self.qhi);
        vsubq_u32(vreinterpretq_u32_f32(vaddq_f32(q, self.magic)), self.base)
    }
}

/// One row's sums, two registers: `sum * mul + bias` (fused, as the scalar
/// reference's `mul_add`), then the epilogue, into `out[..n]`.
#[inline(always)]
unsafe fn store_row<T: Out, const CLAMP: bool, const QDQ: bool>(
    acc: [int32x4_t; 2],
    mul: f32,
    bias: f32,
    regs: &Regs,
    out: *mut T,
    n: usize,
) {
    let (mul, bias) = (vdupq_n_f32(mul), vdupq_n_f32(bias));
    let v = acc.map(|a| vfmaq_f32(bias, vcvtq_f32_s32(a), mul));
    T::store_neon::<CLAMP, QDQ>(regs, v, out, n);
}

/// One SDOT: each of `acc`'s four sums plus the dot product of its pixel's
/// four bytes in `x` with the four bytes of word `LANE` of `w`.
macro_rules! sdot {
    ($acc:expr, $x:expr, $w:expr, $lane:literal) => {
        asm!(
            "sdot {acc:v}.4s, {x:v}.16b, {w:v}.4b[{lane}]",
            acc = inout(vreg) $acc,
            x = in(vreg) $x,
            w = in(vreg) $w,
            lane = const $lane,
            options(pure, nomem, nostack, preserves_flags)
        )
    };
}

/// [`Int8Conv::run_plain`] with SDOT, on packed quads made signed by [`to_signed`].
///
/// # Safety
/// The CPU must have the dot product (`dotprod`); `packed` holds the op's
/// packed input ([`Int8Conv::word_at`] layout, whole blocks) and `out` whole
/// rows of `pixels` values for channels `first..`.
#[target_feature(enable = "neon,dotprod")]
pub(super) unsafe fn run_dot<T: Out>(op: &Int8Conv, packed: &[u32], out: &mut [T], first: usize) {
    by_epilogue!(run_dot_with, op, packed, out, first)
}

#[target_feature(enable = "neon,dotprod")]
unsafe fn run_dot_with<T: Out, const CLAMP: bool, const QDQ: bool>(
    op: &Int8Conv,
    packed: &[u32],
    out: &mut [T],
    first: usize,
) {
    let (p, opad, quads) = (op.pixels, op.out_channels + MR, op.quads());
    let channels = out.len() / p;
    assert!(packed.len() >= quads * op.padded_pixels() && first + channels <= op.out_channels);
    let regs = Regs::new(&op.epi);
    let out = out.as_mut_ptr();
    for px in (0..p).step_by(PX) {
        let n = (p - px).min(PX);
        let mut o = 0;
        while o < channels {
            let rows = (channels - o).min(MR);
            let mut acc = [[vdupq_n_s32(0); 2]; MR];
            for (r, acc) in acc.iter_mut().enumerate().take(rows) {
                let c = vdupq_n_s32(op.signed_corr(first + o + r));
                *acc = [c, c];
            }
            let mut xs = packed.as_ptr().add(op.word_at(0, px)) as *const i8;
            let mut ws = op.weights.as_ptr().add(first + o) as *const i8;
            for _ in 0..quads {
                let x0 = vld1q_s8(xs);
                let x1 = vld1q_s8(xs.add(16));
                let w0 = vld1q_s8(ws);
                let w1 = vld1q_s8(ws.add(16));
                sdot!(acc[0][0], x0, w0, 0);
                sdot!(acc[0][1], x1, w0, 0);
                sdot!(acc[1][0], x0, w0, 1);
                sdot!(acc[1][1], x1, w0, 1);
                sdot!(acc[2][0], x0, w0, 2);
                sdot!(acc[2][1], x1, w0, 2);
                sdot!(acc[3][0], x0, w0, 3);
                sdot!(acc[3][1], x1, w0, 3);
                sdot!(acc[4][0], x0, w1, 0);
                sdot!(acc[4][1], x1, w1, 0);
                sdot!(acc[5][0], x0, w1, 1);
                sdot!(acc[5][1], x1, w1, 1);
                sdot!(acc[6][0], x0, w1, 2);
                sdot!(acc[6][1], x1, w1, 2);
                sdot!(acc[7][0], x0, w1, 3);
                sdot!(acc[7][1], x1, w1, 3);
                xs = xs.add(4 * NR);
                ws = ws.add(4 * opad);
            }
            store_rows!(op, acc, rows, first, o, out, p, px, n, &regs, [0 1 2 3 4 5 6 7]);
            o += MR;
        }
    }
}

/// [`Int8Conv::run_plain`] with SMLAL, on the quads widened by [`widen`].
///
/// # Safety
/// `wide` holds the op's widened input (whole blocks) and `out` whole rows
/// of `pixels` values for channels `first..`; NEON is the aarch64 baseline.
pub(super) unsafe fn run_wide<T: Out>(op: &Int8Conv, wide: &[i16], out: &mut [T], first: usize) {
    by_epilogue!(run_wide_with, op, wide, out, first)
}

unsafe fn run_wide_with<T: Out, const CLAMP: bool, const QDQ: bool>(
    op: &Int8Conv,
    wide: &[i16],
    out: &mut [T],
    first: usize,
) {
    let (p, opad, depth) = (op.pixels, op.out_channels + MR, 4 * op.quads());
    let channels = out.len() / p;
    let weights = &op.weights16;
    assert!(wide.len() >= depth * op.padded_pixels() && first + channels <= op.out_channels);
    assert!(weights.len() >= depth * opad);
    let regs = Regs::new(&op.epi);
    let out = out.as_mut_ptr();
    for px in (0..p).step_by(PX) {
        let n = (p - px).min(PX);
        let block = wide.as_ptr().add(px / NR * depth * NR + px % NR);
        let mut o = 0;
        while o < channels {
            let rows = (channels - o).min(MR);
            let mut acc = [[vdupq_n_s32(0); 2]; MR];
            for (r, acc) in acc.iter_mut().enumerate().take(rows) {
                let c = vdupq_n_s32(op.corr[first + o + r]);
                *acc = [c, c];
            }
            let mut xs = block;
            let mut ws = weights.as_ptr().add(first + o);
            for _ in 0..depth {
                let x = vld1q_s16(xs);
                let w = vld1q_s16(ws);
                let (xl, xh) = (vget_low_s16(x), x);
                acc[0][0] = vmlal_laneq_s16::<0>(acc[0][0], xl, w);
                acc[0][1] = vmlal_high_laneq_s16::<0>(acc[0][1], xh, w);
                acc[1][0] = vmlal_laneq_s16::<1>(acc[1][0], xl, w);
                acc[1][1] = vmlal_high_laneq_s16::<1>(acc[1][1], xh, w);
                acc[2][0] = vmlal_laneq_s16::<2>(acc[2][0], xl, w);
                acc[2][1] = vmlal_high_laneq_s16::<2>(acc[2][1], xh, w);
                acc[3][0] = vmlal_laneq_s16::<3>(acc[3][0], xl, w);
                acc[3][1] = vmlal_high_laneq_s16::<3>(acc[3][1], xh, w);
                acc[4][0] = vmlal_laneq_s16::<4>(acc[4][0], xl, w);
                acc[4][1] = vmlal_high_laneq_s16::<4>(acc[4][1], xh, w);
                acc[5][0] = vmlal_laneq_s16::<5>(acc[5][0], xl, w);
                acc[5][1] = vmlal_high_laneq_s16::<5>(acc[5][1], xh, w);
                acc[6][0] = vmlal_laneq_s16::<6>(acc[6][0], xl, w);
                acc[6][1] = vmlal_high_laneq_s16::<6>(acc[6][1], xh, w);
                acc[7][0] = vmlal_laneq_s16::<7>(acc[7][0], xl, w);
                acc[7][1] = vmlal_high_laneq_s16::<7>(acc[7][1], xh, w);
                xs = xs.add(NR);
                ws = ws.add(opad);
            }
            store_rows!(op, acc, rows, first, o, out, p, px, n, &regs, [0 1 2 3 4 5 6 7]);
            o += MR;
        }
    }
}

/// Output channels of a [`run_pairs`] block: four, by 8 pixels, leave room
/// for the two quads of input it multiplies at once.
const PAIR_ROWS: usize = 4;

/// [`Int8Conv::run_plain`] for cores without the dot product, on packed quads
/// made signed by [`to_signed`], for weights in -127..=127
/// ([`Int8Conv::pairs_fit`]): `smull`/`smlal` multiply the bytes of two
/// quads (8 pixels' and a channel's, the channel's word broadcast by
/// `ld1r`) into 16-bit lanes, where two products of at most 128 * 127 add
/// up without overflow, and `sadalp` adds neighbouring lanes into 32-bit
/// sums: 16 multiply-adds for 3 instructions, where `smlal` by lane on
/// 16-bit values ([`run_wide`]) does 4 for 1.
///
/// # Safety
/// `packed` holds the op's packed, signed input ([`Int8Conv::word_at`]
/// layout, whole blocks), `out` whole rows of `pixels` values for channels
/// `first..`, and no weight is -128; NEON is the aarch64 baseline.
pub(super) unsafe fn run_pairs<T: Out>(op: &Int8Conv, packed: &[u32], out: &mut [T], first: usize) {
    by_epilogue!(run_pairs_with, op, packed, out, first)
}

unsafe fn run_pairs_with<T: Out, const CLAMP: bool, const QDQ: bool>(
    op: &Int8Conv,
    packed: &[u32],
    out: &mut [T],
    first: usize,
) {
    let (p, opad, quads) = (op.pixels, op.out_channels + MR, op.quads());
    let channels = out.len() / p;
    assert!(packed.len() >= quads * op.padded_pixels() && first + channels <= op.out_channels);
    let regs = Regs::new(&op.epi);
    let out = out.as_mut_ptr();
    for px in (0..p).step_by(PX) {
        let n = (p - px).min(PX);
        let mut o = 0;
        while o < channels {
            let rows = (channels - o).min(PAIR_ROWS);
            // Per channel, four registers of pairs of partial sums: pixels
            // 0-1, 2-3, 4-5, 6-7, two halves of each pixel's quads.
            let mut acc = [[vdupq_n_s32(0); 4]; PAIR_ROWS];
            let mut xs = packed.as_ptr().add(op.word_at(0, px)) as *const i8;
            let mut ws = op.weights.as_ptr().add(first + o) as *const i32;
            // Two quads at a time, 16-bit products summed in pairs.
            for _ in 0..quads / 2 {
                let (x0a, x0b) = (vld1q_s8(xs), vld1q_s8(xs.add(16)));
                let (x1a, x1b) = (vld1q_s8(xs.add(4 * NR)), vld1q_s8(xs.add(4 * NR + 16)));
                for (r, acc) in acc.iter_mut().enumerate() {
                    let w0 = vreinterpretq_s8_s32(vld1q_dup_s32(ws.add(r)));
                    let w1 = vreinterpretq_s8_s32(vld1q_dup_s32(ws.add(opad + r)));
                    let (w0l, w1l) = (vget_low_s8(w0), vget_low_s8(w1));
                    acc[0] = vpadalq_s16(acc[0], vmlal_s8(vmull_s8(vget_low_s8(x0a), w0l), vget_low_s8(x1a), w1l));
                    acc[1] = vpadalq_s16(acc[1], vmlal_high_s8(vmull_high_s8(x0a, w0), x1a, w1));
                    acc[2] = vpadalq_s16(acc[2], vmlal_s8(vmull_s8(vget_low_s8(x0b), w0l), vget_low_s8(x1b), w1l));
                    acc[3] = vpadalq_s16(acc[3], vmlal_high_s8(vmull_high_s8(x0b, w0), x1b, w1));
                }
                xs = xs.add(8 * NR);
                ws = ws.add(2 * opad);
            }
            if quads % 2 == 1 {
                let (x0a, x0b) = (vld1q_s8(xs), vld1q_s8(xs.add(16)));
                for (r, acc) in acc.iter_mut().enumerate() {
                    let w0 = vreinterpretq_s8_s32(vld1q_dup_s32(ws.add(r)));
                    let w0l = vget_low_s8(w0);
                    acc[0] = vpadalq_s16(acc[0], vmull_s8(vget_low_s8(x0a), w0l));
                    acc[1] = vpadalq_s16(acc[1], vmull_high_s8(x0a, w0));
                    acc[2] = vpadalq_s16(acc[2], vmull_s8(vget_low_s8(x0b), w0l));
                    acc[3] = vpadalq_s16(acc[3], vmull_high_s8(x0b, w0));
                }
            }
            for (r, acc) in acc.iter().enumerate().take(rows) {
                let c = first + o + r;
                let corr = vdupq_n_s32(op.signed_corr(c));
                let sums = [vaddq_s32(vpaddq_s32(acc[0], acc[1]), corr), vaddq_s32(vpaddq_s32(acc[2], acc[3]), corr)];
                store_row::<T, CLAMP, QDQ>(sums, op.mul[c], op.bias[c], &regs, out.add((o + r) * p + px), n);
            }
            o += PAIR_ROWS;
        }
    }
}
