//! The aarch64 block loops of [`Int8Conv`]: SDOT on the packed quads for
//! cores with the dot product (Cortex-A55, A76: Pi 5), and SMLAL on pairs
//! of quads (or on the quads widened to 16 bits, for weights of -128) for
//! those without (Cortex-A53, A72: Pi 3, Pi 4).
//!
//! They sum blocks of output channels by 8 pixels in 16 registers of four
//! 32-bit sums, with the zero correction, and run each row of 8 sums
//! through the scalar reference's epilogue arithmetic, so every variant
//! stores the same bits. The SDOT block and the end of the SMLAL-pairs
//! block are assembly from the sums to the stores: the compiler's schedule
//! of the same steps spilled the sums.
//!
//! SDOT multiplies signed bytes, while the packed indices are unsigned
//! (0..=255 counted from the grid's low end): [`super::to_signed`] flips their top
//! bit, which makes each `n - 128`, and the correction counts from
//! `lo + 128` instead (`corr + 128 * wsum`, in the blocks' assembly). The widened form keeps the
//! unsigned indices: a byte fits in an i16 either way.
//!
//! There is no stable intrinsic for SDOT yet, so it is one instruction of
//! inline assembly, in a function compiled with the `dotprod` feature.

use std::arch::aarch64::*;
use std::arch::asm;

use super::super::epilogue::Epilogue;
use super::super::quant_dequant::ROUND_MAGIC;
use super::{Im2col, Int8Conv, Out, MR, NR, PX};

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

/// The first `n` (at most 8) bytes of `v` at `ptr`: whole when `n` is 8,
/// else in pieces of 4, 2 and 1. Not through a buffer and `memcpy`: the
/// call's clobbers made the loops around keep their registers on the stack.
#[inline(always)]
pub(in crate::engine) unsafe fn store_first_u8(v: uint8x8_t, ptr: *mut u8, n: usize) {
    if n >= 8 {
        return vst1_u8(ptr, v);
    }
    let mut bits = vget_lane_u64::<0>(vreinterpret_u64_u8(v));
    let mut p = ptr;
    if n & 4 != 0 {
        (p as *mut u32).write_unaligned(bits as u32);
        bits >>= 32;
        p = p.add(4);
    }
    if n & 2 != 0 {
        (p as *mut u16).write_unaligned(bits as u16);
        bits >>= 16;
        p = p.add(2);
    }
    if n & 1 != 0 {
        *p = bits as u8;
    }
}

/// The first `n` (at most 8) of the values in `v` at `ptr`, in pieces as
/// [`store_first_u8`].
#[inline(always)]
pub(in crate::engine) unsafe fn store_first_f32(v: [float32x4_t; 2], ptr: *mut f32, n: usize) {
    if n >= 8 {
        vst1q_f32(ptr, v[0]);
        return vst1q_f32(ptr.add(4), v[1]);
    }
    let (mut a, mut p) = (v[0], ptr);
    if n & 4 != 0 {
        vst1q_f32(p, a);
        a = v[1];
        p = p.add(4);
    }
    if n & 2 != 0 {
        vst1_f32(p, vget_low_f32(a));
        a = vextq_f32::<2>(a, a);
        p = p.add(2);
    }
    if n & 1 != 0 {
        *p = vgetq_lane_f32::<0>(a);
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
    bytes16(ptr, consts)
}

/// The 8 values at `ptr` as their indices on the op's input grid, one byte each.
#[inline(always)]
unsafe fn bytes8(ptr: *const f32, consts: &GridRegs) -> uint8x8_t {
    let GridRegs { inv, lo, hi, base } = *consts;
    let n: [uint32x4_t; 2] = std::array::from_fn(|i| indices(vld1q_f32(ptr.add(4 * i)), inv, lo, hi, base));
    vmovn_u16(vcombine_u16(vmovn_u32(n[0]), vmovn_u32(n[1])))
}

/// The 16 values at `ptr` as their indices on the op's input grid, one byte each.
#[inline(always)]
unsafe fn bytes16(ptr: *const f32, consts: &GridRegs) -> uint8x16_t {
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
/// each byte's top bit flipped ([`super::to_signed`]): 16 pixels of four channels
/// at a time, interleaved into words by `st4`.
pub(super) fn pack_signed(op: &Int8Conv, x: Rows, packed: &mut [u32]) {
    let (k, p, pp) = (op.in_channels, op.pixels, op.padded_pixels());
    assert!(packed.len() >= op.quads() * pp);
    let grid = GridRegs::new(op);
    // SAFETY: NEON is the aarch64 baseline; every read is of a row's valid
    // pixels (checked slices), every write of 16 words inside `packed`
    // (16 divides NR, so a step's words are consecutive, and `px < pp`
    // puts them below `quads * pp`).
    unsafe {
        let flip = vdupq_n_u8(0x80);
        let zero = vdupq_n_u8(0);
        let base = packed.as_mut_ptr();
        for quad in 0..op.quads() {
            // Whole groups of 16 pixels of four channels straight from the
            // rows (checked once here): no tail, no missing channel.
            let whole = if 4 * quad + 4 <= k { p / 16 * 16 } else { 0 };
            let store = |px: usize, words: [uint8x16_t; 4]| {
                let words = uint8x16x4_t(words[0], words[1], words[2], words[3]);
                vst4q_u8(base.add(op.word_at(quad, px)) as *mut u8, words);
            };
            match x {
                _ if whole == 0 => {}
                Rows::Indices(x) => {
                    let rows: [*const u8; 4] = std::array::from_fn(|j| x[(4 * quad + j) * p..][..p].as_ptr());
                    for px in (0..whole).step_by(16) {
                        store(px, rows.map(|r| veorq_u8(vld1q_u8(r.add(px)), flip)));
                    }
                }
                Rows::Values(x) => {
                    let rows: [*const f32; 4] = std::array::from_fn(|j| x[(4 * quad + j) * p..][..p].as_ptr());
                    for px in (0..whole).step_by(16) {
                        store(px, rows.map(|r| veorq_u8(bytes16(r.add(px), &grid), flip)));
                    }
                }
            }
            for px in (whole..pp).step_by(16) {
                let valid = p.saturating_sub(px).min(16);
                let lane = |j: usize| {
                    let ch = 4 * quad + j;
                    let b = if ch < k && valid > 0 { x.bytes(ch, p, px, valid, &grid) } else { zero };
                    veorq_u8(b, flip)
                };
                store(px, [lane(0), lane(1), lane(2), lane(3)]);
            }
        }
    }
}

/// [`Int8Conv::fill_planes`] 16 values at a time, with the same bytes.
pub(super) fn fill_planes(op: &Int8Conv, g: &Im2col, x: &[f32], bytes: &mut Vec<u8>) {
    let ([h, w], [pt, pl]) = (g.in_hw, g.pad);
    let (hp, wp) = Int8Conv::planes_hw(g);
    bytes.clear();
    bytes.resize(op.in_channels * hp * wp, (-op.input.lo) as u8);
    let grid = GridRegs::new(op);
    for (plane, channel) in bytes.chunks_exact_mut(hp * wp).zip(x.chunks_exact(h * w)) {
        for (row, line) in plane[pt * wp..].chunks_exact_mut(wp).zip(channel.chunks_exact(w)) {
            let (dst, src) = (row[pl..pl + w].as_mut_ptr(), line.as_ptr());
            // SAFETY: NEON is the aarch64 baseline; every read and write is
            // inside the row's `w` values (checked slices above): by 16, the
            // last 16 overlapping what is done (the same bytes again), by 8
            // likewise, and rows of fewer than 8 through `row_bytes`.
            unsafe {
                if w >= 16 {
                    let mut at = 0;
                    while at + 16 < w {
                        vst1q_u8(dst.add(at), bytes16(src.add(at), &grid));
                        at += 16;
                    }
                    vst1q_u8(dst.add(w - 16), bytes16(src.add(w - 16), &grid));
                } else if w >= 8 {
                    vst1_u8(dst, bytes8(src, &grid));
                    vst1_u8(dst.add(w - 8), bytes8(src.add(w - 8), &grid));
                } else {
                    store_first_u8(vget_low_u8(row_bytes(line, w, &grid)), dst, w);
                }
            }
        }
    }
}

/// [`Int8Conv::pack_im2col`] then [`super::to_signed`], 16 pixels of a row at a
/// time for strides 1 and 2: four taps' bytes loaded as vectors (`ld2`
/// takes every other byte for a stride of 2), flipped and interleaved into
/// words by `st4`, where the plain loops load each byte on its own.
pub(super) fn pack_im2col_signed(op: &Int8Conv, g: &Im2col, bytes: &[u8], packed: &mut [u32]) {
    let depth = op.depth();
    let ([sh, sw], [ho, wo]) = (g.strides, g.out_hw);
    let (_, wp) = Int8Conv::planes_hw(g);
    let last = (ho - 1) * sh * wp + (wo - 1) * sw + g.offsets[depth - 1];
    assert!(last < bytes.len() && packed.len() >= op.quads() * op.padded_pixels());
    let get = |at: usize| -> u32 {
        debug_assert!(at <= last);
        // SAFETY: every `at` is a pixel's position plus a tap's offset, at most `last`.
        unsafe { *bytes.get_unchecked(at) as u32 }
    };
    op.im2col_runs(g, packed, |packed, o, start, at, n| {
        let far = o.iter().max().copied().unwrap_or(0);
        let mut i = 0;
        // Whole vectors whose reads stay inside the planes.
        while i + 16 <= n && (sw == 1 || sw == 2) && start + (i + 16) * sw + far <= bytes.len() {
            let pos = start + i * sw;
            // SAFETY: NEON is the aarch64 baseline; the loads end at
            // `pos + 16 * sw + far`, checked above, and the 16 words
            // are inside `packed` (n <= NR - px % NR, 16 divides NR).
            unsafe {
                let flip = vdupq_n_u8(0x80);
                let tap = |off: usize| {
                    let src = bytes.as_ptr().add(pos + off);
                    let b = if sw == 1 { vld1q_u8(src) } else { vld2q_u8(src).0 };
                    veorq_u8(b, flip)
                };
                let words = uint8x16x4_t(tap(o[0]), tap(o[1]), tap(o[2]), tap(o[3]));
                vst4q_u8(packed.as_mut_ptr().add(at + i) as *mut u8, words);
            }
            i += 16;
        }
        // Then 8 (short rows: small images, strided layers).
        while i + 8 <= n && (sw == 1 || sw == 2) && start + (i + 8) * sw + far + 8 <= bytes.len() {
            let pos = start + i * sw;
            // SAFETY: as above, with 8 pixels (`ld2` of 16 bytes).
            unsafe {
                let flip = vdup_n_u8(0x80);
                let tap = |off: usize| {
                    let src = bytes.as_ptr().add(pos + off);
                    let b = if sw == 1 { vld1_u8(src) } else { vld2_u8(src).0 };
                    veor_u8(b, flip)
                };
                let words = uint8x8x4_t(tap(o[0]), tap(o[1]), tap(o[2]), tap(o[3]));
                vst4_u8(packed.as_mut_ptr().add(at + i) as *mut u8, words);
            }
            i += 8;
        }
        for (j, word) in packed[at + i..at + n].iter_mut().enumerate() {
            let pos = start + (i + j) * sw;
            *word =
                (get(pos + o[0]) | get(pos + o[1]) << 8 | get(pos + o[2]) << 16 | get(pos + o[3]) << 24) ^ 0x8080_8080;
        }
    });
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

/// [`Int8Conv::run_plain`] with SDOT, on packed quads made signed by [`super::to_signed`].
///
/// # Safety
/// The CPU must have the dot product (`dotprod`); `packed` holds the op's
/// packed input ([`Int8Conv::word_at`] layout, whole blocks) and `out` whole
/// rows of `pixels` values for channels `first..`.
#[target_feature(enable = "neon,dotprod")]
pub(super) unsafe fn run_dot<T: Out>(op: &Int8Conv, packed: &[u32], out: &mut [T], first: usize) {
    by_epilogue!(run_dot_with, op, packed, out, first)
}

/// The clip of one row's two value registers (v0, v1) to `[v4, v5]`, or nothing.
macro_rules! dot_clip {
    (true) => {
        concat!(
            "fmaxnm v0.4s, v0.4s, v4.4s\n",
            "fmaxnm v1.4s, v1.4s, v4.4s\n",
            "fminnm v0.4s, v0.4s, v5.4s\n",
            "fminnm v1.4s, v1.4s, v5.4s\n",
        )
    };
    (false) => {
        ""
    };
}

/// One row's end: f32 values as they are (`f32`), through the output pair
/// (`qdq`: inverse step v6, bounds v7-v8, step v9, `ROUND_MAGIC` in v10 as
/// the reference rounds: `frintn` would give -0.0 where it gives 0.0), or
/// as the pair's indices (`u8`: the low end v10 as i16 lanes, the top index
/// v11 as bytes), stored at `{o}`, which then moves on by `{os}` bytes.
///
/// The indices round with `fcvtns` (to nearest, ties to even) where the
/// reference adds `ROUND_MAGIC`: the same integer for every value within
/// 2^22 of zero, and rounding then clamping to whole bounds is clamping
/// then rounding. They are clamped as integers (saturating narrows, then
/// `umin`): four instructions a row fewer than the float steps, the same
/// bytes.
macro_rules! dot_out {
    (f32) => {
        concat!("stp q0, q1, [{o}]\n", "add {o}, {o}, {os}\n")
    };
    (qdq) => {
        concat!(
            "fmul v0.4s, v0.4s, v6.4s\n",
            "fmul v1.4s, v1.4s, v6.4s\n",
            "fmax v0.4s, v0.4s, v7.4s\n",
            "fmax v1.4s, v1.4s, v7.4s\n",
            "fmin v0.4s, v0.4s, v8.4s\n",
            "fmin v1.4s, v1.4s, v8.4s\n",
            "fadd v0.4s, v0.4s, v10.4s\n",
            "fadd v1.4s, v1.4s, v10.4s\n",
            "fsub v0.4s, v0.4s, v10.4s\n",
            "fsub v1.4s, v1.4s, v10.4s\n",
            "fmul v0.4s, v0.4s, v9.4s\n",
            "fmul v1.4s, v1.4s, v9.4s\n",
            dot_out!(f32),
        )
    };
    (u8) => {
        concat!(
            "fmul v0.4s, v0.4s, v6.4s\n",
            "fmul v1.4s, v1.4s, v6.4s\n",
            "fcvtns v0.4s, v0.4s\n",
            "fcvtns v1.4s, v1.4s\n",
            "sqxtn v0.4h, v0.4s\n",
            "sqxtn2 v0.8h, v1.4s\n",
            "sqsub v0.8h, v0.8h, v10.8h\n",
            "sqxtun v0.8b, v0.8h\n",
            "umin v0.8b, v0.8b, v11.8b\n",
            "str d0, [{o}]\n",
            "add {o}, {o}, {os}\n",
        )
    };
}

/// One output channel's row of 8 sums (registers `$a`, `$b`): to f32, times
/// the channel's scale plus its bias (lane `$l` of `$m` and `$bi`, fused),
/// then the clip and the store.
macro_rules! dot_row {
    ($a:literal, $b:literal, $l:literal, $m:literal, $bi:literal, $clip:tt, $out:tt) => {
        concat!(
            "scvtf v",
            $a,
            ".4s, v",
            $a,
            ".4s\n",
            "scvtf v",
            $b,
            ".4s, v",
            $b,
            ".4s\n",
            "dup v0.4s, v",
            $bi,
            ".s[",
            $l,
            "]\n",
            "dup v1.4s, v",
            $bi,
            ".s[",
            $l,
            "]\n",
            "fmla v0.4s, v",
            $a,
            ".4s, v",
            $m,
            ".s[",
            $l,
            "]\n",
            "fmla v1.4s, v",
            $b,
            ".4s, v",
            $m,
            ".s[",
            $l,
            "]\n",
            dot_clip!($clip),
            dot_out!($out),
        )
    };
}

/// A [`run_dot`] block in assembly: the 16 sums (v16-v31, two per channel)
/// start from the channels' signed corrections, take `{n}` quads of SDOT,
/// then go through the epilogue, row by row.
macro_rules! dot_block {
    ($clip:tt, $out:tt, $($operands:tt)*) => {
        asm!(
            // corr + 128 * wsum for 8 channels: the correction of signed bytes.
            "ldp q0, q1, [{corr}]",
            "ldp q2, q3, [{wsum}]",
            "shl v2.4s, v2.4s, #7",
            "shl v3.4s, v3.4s, #7",
            "add v0.4s, v0.4s, v2.4s",
            "add v1.4s, v1.4s, v3.4s",
            "dup v16.4s, v0.s[0]", "dup v17.4s, v0.s[0]",
            "dup v18.4s, v0.s[1]", "dup v19.4s, v0.s[1]",
            "dup v20.4s, v0.s[2]", "dup v21.4s, v0.s[2]",
            "dup v22.4s, v0.s[3]", "dup v23.4s, v0.s[3]",
            "dup v24.4s, v1.s[0]", "dup v25.4s, v1.s[0]",
            "dup v26.4s, v1.s[1]", "dup v27.4s, v1.s[1]",
            "dup v28.4s, v1.s[2]", "dup v29.4s, v1.s[2]",
            "dup v30.4s, v1.s[3]", "dup v31.4s, v1.s[3]",
            "2:",
            "ldp q0, q1, [{xs}], #128",
            "ld1 {{v2.16b, v3.16b}}, [{ws}], {wstride}",
            "sdot v16.4s, v0.16b, v2.4b[0]", "sdot v17.4s, v1.16b, v2.4b[0]",
            "sdot v18.4s, v0.16b, v2.4b[1]", "sdot v19.4s, v1.16b, v2.4b[1]",
            "sdot v20.4s, v0.16b, v2.4b[2]", "sdot v21.4s, v1.16b, v2.4b[2]",
            "sdot v22.4s, v0.16b, v2.4b[3]", "sdot v23.4s, v1.16b, v2.4b[3]",
            "sdot v24.4s, v0.16b, v3.4b[0]", "sdot v25.4s, v1.16b, v3.4b[0]",
            "sdot v26.4s, v0.16b, v3.4b[1]", "sdot v27.4s, v1.16b, v3.4b[1]",
            "sdot v28.4s, v0.16b, v3.4b[2]", "sdot v29.4s, v1.16b, v3.4b[2]",
            "sdot v30.4s, v0.16b, v3.4b[3]", "sdot v31.4s, v1.16b, v3.4b[3]",
            "subs {n}, {n}, #1",
            "b.ne 2b",
            "ldp q12, q13, [{mul}]",
            "ldp q14, q15, [{bias}]",
            "ld4r {{v4.4s, v5.4s, v6.4s, v7.4s}}, [{c}], #16",
            "ld4r {{v8.4s, v9.4s, v10.4s, v11.4s}}, [{c}]",
            dot_row!(16, 17, 0, 12, 14, $clip, $out),
            dot_row!(18, 19, 1, 12, 14, $clip, $out),
            dot_row!(20, 21, 2, 12, 14, $clip, $out),
            dot_row!(22, 23, 3, 12, 14, $clip, $out),
            dot_row!(24, 25, 0, 13, 15, $clip, $out),
            dot_row!(26, 27, 1, 13, 15, $clip, $out),
            dot_row!(28, 29, 2, 13, 15, $clip, $out),
            dot_row!(30, 31, 3, 13, 15, $clip, $out),
            $($operands)*
            out("v0") _, out("v1") _, out("v2") _, out("v3") _, out("v4") _, out("v5") _, out("v6") _, out("v7") _,
            out("v8") _, out("v9") _, out("v10") _, out("v11") _, out("v12") _, out("v13") _, out("v14") _, out("v15") _,
            out("v16") _, out("v17") _, out("v18") _, out("v19") _, out("v20") _, out("v21") _, out("v22") _, out("v23") _,
            out("v24") _, out("v25") _, out("v26") _, out("v27") _, out("v28") _, out("v29") _, out("v30") _, out("v31") _,
            options(nostack),
        )
    };
}

/// The epilogue's constants in the order the blocks load them (v4-v11, by two `ld4r`):
/// the clip's bounds, the output pair's inverse step, bounds and step;
/// then for indices (`u8`) the pair's low end as two i16 and its top index
/// (`hi - lo`, at most 255: a byte grid) as four bytes, else `ROUND_MAGIC`.
fn epilogue_consts(op: &Int8Conv, index: bool) -> [u32; 8] {
    let qd = op.epi.by_value().qd;
    let (v10, v11) = if index {
        let lo = qd.lo as i16 as u16 as u32;
        let top = (qd.hi - qd.lo).clamp(0.0, 255.0) as u32;
        (lo * 0x0001_0001, top * 0x0101_0101)
    } else {
        (ROUND_MAGIC.to_bits(), 0)
    };
    [
        op.epi.clamp.0.to_bits(),
        op.epi.clamp.1.to_bits(),
        qd.inv_scale.to_bits(),
        qd.lo.to_bits(),
        qd.hi.to_bits(),
        qd.scale.to_bits(),
        v10,
        v11,
    ]
}

/// The end of a [`run_pairs`] block in assembly: each channel's pairs of
/// partial sums (v16-v31, four per channel) added into 8 sums (two
/// registers), plus its signed correction, then the rows as in [`dot_block`].
macro_rules! pairs_end {
    ($clip:tt, $out:tt, $($operands:tt)*) => {
        asm!(
            "addp v16.4s, v16.4s, v17.4s", "addp v17.4s, v18.4s, v19.4s",
            "addp v20.4s, v20.4s, v21.4s", "addp v21.4s, v22.4s, v23.4s",
            "addp v24.4s, v24.4s, v25.4s", "addp v25.4s, v26.4s, v27.4s",
            "addp v28.4s, v28.4s, v29.4s", "addp v29.4s, v30.4s, v31.4s",
            "ldr q0, [{corr}]",
            "ldr q1, [{wsum}]",
            "shl v1.4s, v1.4s, #7",
            "add v0.4s, v0.4s, v1.4s",
            "dup v1.4s, v0.s[0]", "add v16.4s, v16.4s, v1.4s", "add v17.4s, v17.4s, v1.4s",
            "dup v1.4s, v0.s[1]", "add v20.4s, v20.4s, v1.4s", "add v21.4s, v21.4s, v1.4s",
            "dup v1.4s, v0.s[2]", "add v24.4s, v24.4s, v1.4s", "add v25.4s, v25.4s, v1.4s",
            "dup v1.4s, v0.s[3]", "add v28.4s, v28.4s, v1.4s", "add v29.4s, v29.4s, v1.4s",
            "ldr q12, [{mul}]",
            "ldr q14, [{bias}]",
            "ld4r {{v4.4s, v5.4s, v6.4s, v7.4s}}, [{c}], #16",
            "ld4r {{v8.4s, v9.4s, v10.4s, v11.4s}}, [{c}]",
            dot_row!(16, 17, 0, 12, 14, $clip, $out),
            dot_row!(20, 21, 1, 12, 14, $clip, $out),
            dot_row!(24, 25, 2, 12, 14, $clip, $out),
            dot_row!(28, 29, 3, 12, 14, $clip, $out),
            $($operands)*
            out("v0") _, out("v1") _, out("v4") _, out("v5") _, out("v6") _, out("v7") _,
            out("v8") _, out("v9") _, out("v10") _, out("v11") _, out("v12") _, out("v14") _,
            options(nostack),
        )
    };
}

/// What a block with fewer than `R` channels or `PX` pixels reads and
/// stores instead of the op's arrays and the output: per-channel values
/// zero past the last channel, and a spare block of rows copied out after.
struct Short<T, const R: usize> {
    spare: [[T; PX]; R],
    corr: [i32; R],
    wsum: [i32; R],
    mul: [f32; R],
    bias: [f32; R],
}

impl<T: Out, const R: usize> Short<T, R> {
    #[inline(always)]
    fn new() -> Self {
        Short { spare: [[T::default(); PX]; R], corr: [0; R], wsum: [0; R], mul: [0.0; R], bias: [0.0; R] }
    }

    /// Channels `c0..c0 + R`'s correction, weight sum, scale and bias: in
    /// the op's arrays when it has them all, else copied here.
    ///
    /// # Safety
    /// The arrays hold a value per output channel (`Int8Conv::check_channels`).
    #[inline(always)]
    unsafe fn channels(&mut self, op: &Int8Conv, c0: usize) -> (*const i32, *const i32, *const f32, *const f32) {
        if c0 + R <= op.out_channels {
            (op.corr.as_ptr().add(c0), op.wsum.as_ptr().add(c0), op.mul.as_ptr().add(c0), op.bias.as_ptr().add(c0))
        } else {
            let k = op.out_channels - c0;
            self.corr[..k].copy_from_slice(&op.corr[c0..]);
            self.wsum[..k].copy_from_slice(&op.wsum[c0..]);
            self.mul[..k].copy_from_slice(&op.mul[c0..]);
            self.bias[..k].copy_from_slice(&op.bias[c0..]);
            (self.corr.as_ptr(), self.wsum.as_ptr(), self.mul.as_ptr(), self.bias.as_ptr())
        }
    }

    /// Where a block stores its first row and the bytes between rows: at
    /// `out` (rows `p` values apart) for a whole block, else in the spare.
    #[inline(always)]
    fn dst(&mut self, whole: bool, out: *mut T, p: usize) -> (*mut T, usize) {
        if whole {
            (out, p * std::mem::size_of::<T>())
        } else {
            (self.spare.as_mut_ptr() as *mut T, PX * std::mem::size_of::<T>())
        }
    }

    /// A short block's first `rows` rows of `n` values, from the spare to `out` (rows `p` apart).
    ///
    /// # Safety
    /// `out` must be writable for those rows.
    #[inline(always)]
    unsafe fn copy_out(&self, rows: usize, out: *mut T, p: usize, n: usize) {
        for (r, row) in self.spare.iter().enumerate().take(rows) {
            std::ptr::copy_nonoverlapping(row.as_ptr(), out.add(r * p), n);
        }
    }
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
    assert!(packed.len() >= quads * op.padded_pixels() && quads >= 1);
    op.check_channels(first, channels);
    // Indices (u8) always end in the output pair; f32 values may.
    let index = std::mem::size_of::<T>() == 1;
    assert!(!index || QDQ, "indices need the output's pair");
    let consts = epilogue_consts(op, index);
    let mut short = Short::<T, MR>::new();
    let out = out.as_mut_ptr();
    let wstride = 4 * opad;
    for px in (0..p).step_by(PX) {
        let n = (p - px).min(PX);
        let mut o = 0;
        while o < channels {
            let rows = (channels - o).min(MR);
            let c0 = first + o;
            let (corr, wsum, mul, bias) = short.channels(op, c0);
            let whole = rows == short.spare.len() && n == PX;
            let (dst, os) = short.dst(whole, out.add(o * p + px), p);
            let xs = packed.as_ptr().add(op.word_at(0, px));
            let ws = op.weights.as_ptr().add(c0);
            macro_rules! go {
                ($clip:tt, $out:tt) => {
                    dot_block!(
                        $clip, $out,
                        corr = in(reg) corr,
                        wsum = in(reg) wsum,
                        xs = inout(reg) xs => _,
                        ws = inout(reg) ws => _,
                        wstride = in(reg) wstride,
                        n = inout(reg) quads => _,
                        mul = in(reg) mul,
                        bias = in(reg) bias,
                        c = inout(reg) consts.as_ptr() => _,
                        o = inout(reg) dst => _,
                        os = in(reg) os,
                    )
                };
            }
            by_store!(go, index, CLAMP, QDQ);
            if !whole {
                short.copy_out(rows, out.add(o * p + px), p, n);
            }
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
    assert!(wide.len() >= depth * op.padded_pixels());
    op.check_channels(first, channels);
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
                let c = vdupq_n_s32(*op.corr.get_unchecked(first + o + r));
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

/// One output channel's part of a [`pairs_loop`] step: the products of
/// pixels v0-v3 and the channel's two broadcast words (`$w0`, `$w1`), in
/// pairs of 16-bit lanes (v12-v15), then into its four sums (`$a0`..`$a3`)
/// by `$op`: `saddlp` on the first step, which sets them, `sadalp` after.
macro_rules! pairs_channel {
    ($op:literal, $w0:literal, $w1:literal, $a0:literal, $a1:literal, $a2:literal, $a3:literal) => {
        concat!(
            "smull v12.8h, v0.8b, v",
            $w0,
            ".8b\n",
            "smull2 v13.8h, v0.16b, v",
            $w0,
            ".16b\n",
            "smull v14.8h, v1.8b, v",
            $w0,
            ".8b\n",
            "smull2 v15.8h, v1.16b, v",
            $w0,
            ".16b\n",
            "smlal v12.8h, v2.8b, v",
            $w1,
            ".8b\n",
            "smlal2 v13.8h, v2.16b, v",
            $w1,
            ".16b\n",
            "smlal v14.8h, v3.8b, v",
            $w1,
            ".8b\n",
            "smlal2 v15.8h, v3.16b, v",
            $w1,
            ".16b\n",
            $op,
            " v",
            $a0,
            ".4s, v12.8h\n",
            $op,
            " v",
            $a1,
            ".4s, v13.8h\n",
            $op,
            " v",
            $a2,
            ".4s, v14.8h\n",
            $op,
            " v",
            $a3,
            ".4s, v15.8h\n",
        )
    };
}

/// One [`pairs_loop`] step: two quads of 8 pixels and of 4 channels' weights
/// loaded, then each channel's products added by `$op`.
macro_rules! pairs_step {
    ($op:literal) => {
        concat!(
            "ldp q2, q3, [{xs}, #128]\n",
            "ldp q0, q1, [{xs}], #256\n",
            "ld4r {{v4.4s, v5.4s, v6.4s, v7.4s}}, [{ws}], {skip}\n",
            "ld4r {{v8.4s, v9.4s, v10.4s, v11.4s}}, [{ws}], {skip}\n",
            pairs_channel!($op, "4", "8", "16", "17", "18", "19"),
            pairs_channel!($op, "5", "9", "20", "21", "22", "23"),
            pairs_channel!($op, "6", "10", "24", "25", "26", "27"),
            pairs_channel!($op, "7", "11", "28", "29", "30", "31"),
            "subs {n}, {n}, #1\n",
        )
    };
}

/// `steps` double-quad steps of one [`run_pairs`] block: 4 output channels
/// (`ws`, then `opad` words on per quad) by 8 pixels (`xs`, 4 * `NR` bytes on
/// per quad), returned as per channel four registers of sums (pixels 0-1,
/// 2-3, 4-5, 6-7, two sums each).
///
/// In assembly because the compiler's own schedule of the same intrinsics
/// cost 78 instructions per step, where these are 54: it widened each
/// weight word to 8 bytes and took the pixels' high halves with `ext`,
/// added an address per `ld1r`, and spilled two sums. Here the 16 sums
/// stay in v16-v31, the 8 broadcast weight words in v4-v11 (two `ld4r`,
/// each the four channels' words of one quad), the pixels in v0-v3, the
/// 16-bit products in v12-v15. The first step sets the sums (`saddlp`), so
/// that they need no zeroing: 16 instructions a block.
///
/// # Safety
/// `xs` and `ws` must hold `steps` steps (`steps >= 1`) as laid out above.
#[inline(always)]
unsafe fn pairs_loop(xs: *const i8, ws: *const i32, steps: usize, opad: usize) -> [[int32x4_t; 4]; PAIR_ROWS] {
    debug_assert!(steps >= 1);
    // From channel 0 of a quad to channel 0 of the next one: `ld4r` takes
    // four channels' words at once, one broadcast register each.
    let skip = opad * 4;
    let ([a0, a1, a2, a3], [b0, b1, b2, b3], [c0, c1, c2, c3], [d0, d1, d2, d3]);
    asm!(
        pairs_step!("saddlp"),
        "b.eq 3f",
        "2:",
        pairs_step!("sadalp"),
        "b.ne 2b",
        "3:",
        xs = inout(reg) xs => _,
        ws = inout(reg) ws => _,
        n = inout(reg) steps => _,
        skip = in(reg) skip,
        out("v16") a0, out("v17") a1, out("v18") a2, out("v19") a3,
        out("v20") b0, out("v21") b1, out("v22") b2, out("v23") b3,
        out("v24") c0, out("v25") c1, out("v26") c2, out("v27") c3,
        out("v28") d0, out("v29") d1, out("v30") d2, out("v31") d3,
        out("v0") _, out("v1") _, out("v2") _, out("v3") _, out("v4") _, out("v5") _, out("v6") _, out("v7") _,
        out("v8") _, out("v9") _, out("v10") _, out("v11") _, out("v12") _, out("v13") _, out("v14") _, out("v15") _,
        options(nostack, readonly),
    );
    [[a0, a1, a2, a3], [b0, b1, b2, b3], [c0, c1, c2, c3], [d0, d1, d2, d3]]
}

/// Output channels of a [`run_pairs`] block: four, by 8 pixels, leave room
/// for the two quads of input it multiplies at once.
const PAIR_ROWS: usize = 4;

/// [`Int8Conv::run_plain`] for cores without the dot product, on packed quads
/// made signed by [`super::to_signed`], for weights in -127..=127
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
    assert!(packed.len() >= quads * op.padded_pixels());
    op.check_channels(first, channels);
    let index = std::mem::size_of::<T>() == 1;
    assert!(!index || QDQ, "indices need the output's pair");
    let consts = epilogue_consts(op, index);
    let mut short = Short::<T, PAIR_ROWS>::new();
    let out = out.as_mut_ptr();
    for px in (0..p).step_by(PX) {
        let n = (p - px).min(PX);
        let mut o = 0;
        while o < channels {
            let rows = (channels - o).min(PAIR_ROWS);
            // Per channel, four registers of pairs of partial sums: pixels
            // 0-1, 2-3, 4-5, 6-7, two halves of each pixel's quads.
            let mut xs = packed.as_ptr().add(op.word_at(0, px)) as *const i8;
            let mut ws = op.weights.as_ptr().add(first + o) as *const i32;
            // Two quads at a time, 16-bit products summed in pairs.
            let steps = quads / 2;
            let mut acc = if steps > 0 {
                let acc = pairs_loop(xs, ws, steps, opad);
                xs = xs.add(steps * 8 * NR);
                ws = ws.add(steps * 2 * opad);
                acc
            } else {
                [[vdupq_n_s32(0); 4]; PAIR_ROWS]
            };
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
            let c0 = first + o;
            let (corr, wsum, mul, bias) = short.channels(op, c0);
            let whole = rows == short.spare.len() && n == PX;
            let (dst, os) = short.dst(whole, out.add(o * p + px), p);
            macro_rules! go {
                ($clip:tt, $out:tt) => {
                    pairs_end!(
                        $clip, $out,
                        inout("v16") acc[0][0] => _, inout("v17") acc[0][1] => _,
                        inout("v18") acc[0][2] => _, inout("v19") acc[0][3] => _,
                        inout("v20") acc[1][0] => _, inout("v21") acc[1][1] => _,
                        inout("v22") acc[1][2] => _, inout("v23") acc[1][3] => _,
                        inout("v24") acc[2][0] => _, inout("v25") acc[2][1] => _,
                        inout("v26") acc[2][2] => _, inout("v27") acc[2][3] => _,
                        inout("v28") acc[3][0] => _, inout("v29") acc[3][1] => _,
                        inout("v30") acc[3][2] => _, inout("v31") acc[3][3] => _,
                        corr = in(reg) corr,
                        wsum = in(reg) wsum,
                        mul = in(reg) mul,
                        bias = in(reg) bias,
                        c = inout(reg) consts.as_ptr() => _,
                        o = inout(reg) dst => _,
                        os = in(reg) os,
                    )
                };
            }
            by_store!(go, index, CLAMP, QDQ);
            if !whole {
                short.copy_out(rows, out.add(o * p + px), p, n);
            }
            o += PAIR_ROWS;
        }
    }
}
