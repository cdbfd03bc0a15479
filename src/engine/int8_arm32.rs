//! The 32-bit ARM (armv7, 32-bit Raspberry Pi OS) block loop of
//! [`Int8Conv`]: `vmull.s8`/`vmlal.s8` on the bytes of two quads into 16-bit
//! lanes, `vpadal.s16` into 32-bit sums, then the scale, bias, clip and
//! output pair on the same registers, for blocks of 2 output channels by 8
//! pixels: the aarch64 `neon` rung's arithmetic (`int8_neon.rs`) on half
//! the registers.
//!
//! All of it is inline assembly: Rust's NEON intrinsics for 32-bit ARM are
//! not stable, and the `armv7-unknown-linux-gnueabihf` target's baseline has
//! no NEON, so each block declares it (`.fpu neon-vfpv4`) and the loops are
//! only chosen when the kernel reports NEON and VFPv4 (`vfma`: every
//! Cortex-A7, A53 and A72, i.e. Pi 2, 3, 4 and Zero 2 W in 32-bit mode) in
//! the auxiliary vector ([`cpu_has_neon`]). The compiler knows only
//! `d0`-`d15` there (the target has 16 double registers for VFP), so the
//! blocks declare those as clobbered and keep their sums in `q8`-`q15`
//! (`d16`-`d31`), which compiled code of this target never holds and the
//! calling convention does not preserve.
//!
//! The epilogue's arithmetic is the scalar reference's, step for step
//! (`vfma` is fused like `mul_add`; the rounding is the same
//! `ROUND_MAGIC` addition), so the loops store the reference's bits; NEON
//! flushes subnormal floats to zero, which only a result below 2^-126 in
//! magnitude could notice.

use std::arch::asm;

use super::super::quant_dequant::ROUND_MAGIC;
use super::{Int8Conv, Out, NR};

/// Output channels per block: two, by 8 pixels, take 8 of the 16 quad
/// registers for sums, leaving the other 8 for two quads of input, the
/// weights and the products.
const ROWS: usize = 2;

/// Pixels per block.
const PX: usize = 8;

const _: () = assert!(NR.is_multiple_of(PX));

/// Whether this CPU runs the loops: NEON and the fused multiply-add of
/// VFPv4, as the kernel reports them (`AT_HWCAP`).
pub(in crate::engine) fn cpu_has_neon() -> bool {
    const HWCAP_NEON: libc::c_ulong = 1 << 12;
    const HWCAP_VFPV4: libc::c_ulong = 1 << 16;
    // SAFETY: getauxval only reads the process's auxiliary vector.
    let caps = unsafe { libc::getauxval(libc::AT_HWCAP) };
    caps & HWCAP_NEON != 0 && caps & HWCAP_VFPV4 != 0
}

/// What one block's assembly reads after its sums: where to store, each
/// channel's correction, scale and bias, then the epilogue's constants,
/// in the order the blocks load them.
#[repr(C)]
struct Block<T> {
    out: [*mut T; ROWS],
    /// Per channel: the signed correction (as i32 bits), scale, bias.
    chans: [[u32; 3]; ROWS],
    clip: [f32; 2],
    /// `inv_scale`, `lo`, `hi`, `scale` of the output pair, `ROUND_MAGIC`,
    /// and the pattern of `lo + ROUND_MAGIC` (index 0).
    pair: [u32; 6],
}

/// Zeroes the sums, runs `steps` double-quad steps, then `odd` single quads,
/// and adds each sum's pairs: channel 0's 8 sums end in
/// `q8`-`q9`, channel 1's in `q12`-`q13`.
macro_rules! sums_text {
    () => {
        concat!(
            ".fpu neon-vfpv4\n",
            "vmov.i32 q8, #0\n",
            "vmov.i32 q9, #0\n",
            "vmov.i32 q10, #0\n",
            "vmov.i32 q11, #0\n",
            "vmov.i32 q12, #0\n",
            "vmov.i32 q13, #0\n",
            "vmov.i32 q14, #0\n",
            "vmov.i32 q15, #0\n",
            "cmp {n}, #0\n",
            "beq 3f\n",
            "2:\n",
            // Two quads of 8 pixels: 32 bytes each, NR words apart.
            "vld1.8 {{d0-d3}}, [{xs}], {quad}\n",
            "vld1.8 {{d4-d7}}, [{xs}], {quad}\n",
            // Each channel's word of both quads, broadcast.
            "vld1.32 {{d8[]}}, [{ws}]!\n",
            "vld1.32 {{d10[]}}, [{ws}], {skip}\n",
            "vld1.32 {{d9[]}}, [{ws}]!\n",
            "vld1.32 {{d11[]}}, [{ws}], {skip}\n",
            "vmull.s8 q6, d0, d8\n",
            "vmlal.s8 q6, d4, d9\n",
            "vmull.s8 q7, d1, d8\n",
            "vmlal.s8 q7, d5, d9\n",
            "vpadal.s16 q8, q6\n",
            "vpadal.s16 q9, q7\n",
            "vmull.s8 q6, d2, d8\n",
            "vmlal.s8 q6, d6, d9\n",
            "vmull.s8 q7, d3, d8\n",
            "vmlal.s8 q7, d7, d9\n",
            "vpadal.s16 q10, q6\n",
            "vpadal.s16 q11, q7\n",
            "vmull.s8 q6, d0, d10\n",
            "vmlal.s8 q6, d4, d11\n",
            "vmull.s8 q7, d1, d10\n",
            "vmlal.s8 q7, d5, d11\n",
            "vpadal.s16 q12, q6\n",
            "vpadal.s16 q13, q7\n",
            "vmull.s8 q6, d2, d10\n",
            "vmlal.s8 q6, d6, d11\n",
            "vmull.s8 q7, d3, d10\n",
            "vmlal.s8 q7, d7, d11\n",
            "vpadal.s16 q14, q6\n",
            "vpadal.s16 q15, q7\n",
            "subs {n}, {n}, #1\n",
            "bne 2b\n",
            // Then `odd` quads one at a time: one product per 16-bit lane,
            // exact for any weights.
            "3:\n",
            "cmp {odd}, #0\n",
            "beq 4f\n",
            "vld1.8 {{d0-d3}}, [{xs}], {quad}\n",
            "vld1.32 {{d8[]}}, [{ws}]!\n",
            "vld1.32 {{d10[]}}, [{ws}], {skip}\n",
            "vmull.s8 q6, d0, d8\n",
            "vmull.s8 q7, d1, d8\n",
            "vpadal.s16 q8, q6\n",
            "vpadal.s16 q9, q7\n",
            "vmull.s8 q6, d2, d8\n",
            "vmull.s8 q7, d3, d8\n",
            "vpadal.s16 q10, q6\n",
            "vpadal.s16 q11, q7\n",
            "vmull.s8 q6, d0, d10\n",
            "vmull.s8 q7, d1, d10\n",
            "vpadal.s16 q12, q6\n",
            "vpadal.s16 q13, q7\n",
            "vmull.s8 q6, d2, d10\n",
            "vmull.s8 q7, d3, d10\n",
            "vpadal.s16 q14, q6\n",
            "vpadal.s16 q15, q7\n",
            "subs {odd}, {odd}, #1\n",
            "b 3b\n",
            "4:\n",
            // Each pixel's two halves: pairs of lanes added.
            "vpadd.i32 d16, d16, d17\n",
            "vpadd.i32 d17, d18, d19\n",
            "vpadd.i32 d18, d20, d21\n",
            "vpadd.i32 d19, d22, d23\n",
            "vpadd.i32 d24, d24, d25\n",
            "vpadd.i32 d25, d26, d27\n",
            "vpadd.i32 d26, d28, d29\n",
            "vpadd.i32 d27, d30, d31\n",
            // Where to store ([`Block::out`]), then per channel
            // `(sum + corr) as f32` times the scale plus the bias, fused:
            // channel 0 into q10-q11, channel 1 into q14-q15.
            "ldr {xs}, [{blk}], #4\n",
            "ldr {ws}, [{blk}], #4\n",
            "vld1.32 {{d0[], d1[]}}, [{blk}]!\n",
            "vld1.32 {{d2[], d3[]}}, [{blk}]!\n",
            "vld1.32 {{d4[], d5[]}}, [{blk}]!\n",
            "vadd.i32 q8, q8, q0\n",
            "vadd.i32 q9, q9, q0\n",
            "vcvt.f32.s32 q8, q8\n",
            "vcvt.f32.s32 q9, q9\n",
            "vmov q10, q2\n",
            "vmov q11, q2\n",
            "vfma.f32 q10, q8, q1\n",
            "vfma.f32 q11, q9, q1\n",
            "vld1.32 {{d0[], d1[]}}, [{blk}]!\n",
            "vld1.32 {{d2[], d3[]}}, [{blk}]!\n",
            "vld1.32 {{d4[], d5[]}}, [{blk}]!\n",
            "vadd.i32 q12, q12, q0\n",
            "vadd.i32 q13, q13, q0\n",
            "vcvt.f32.s32 q12, q12\n",
            "vcvt.f32.s32 q13, q13\n",
            "vmov q14, q2\n",
            "vmov q15, q2\n",
            "vfma.f32 q14, q12, q1\n",
            "vfma.f32 q15, q13, q1\n",
        )
    };
}

/// The clip ([`Block::clip`]) of the four value registers, or the skip of
/// its bounds.
macro_rules! clip_text {
    (true) => {
        concat!(
            "vld1.32 {{d0[], d1[]}}, [{blk}]!\n",
            "vld1.32 {{d2[], d3[]}}, [{blk}]!\n",
            "vmax.f32 q10, q10, q0\n",
            "vmax.f32 q11, q11, q0\n",
            "vmax.f32 q14, q14, q0\n",
            "vmax.f32 q15, q15, q0\n",
            "vmin.f32 q10, q10, q1\n",
            "vmin.f32 q11, q11, q1\n",
            "vmin.f32 q14, q14, q1\n",
            "vmin.f32 q15, q15, q1\n",
        )
    };
    (false) => {
        "add {blk}, {blk}, #8\n"
    };
}

/// The pair's constants ([`Block::pair`]) in q0-q5, and the four value
/// registers onto its grid, as `q + ROUND_MAGIC` (rounded, not yet back).
macro_rules! grid_text {
    () => {
        concat!(
            "vld1.32 {{d0[], d1[]}}, [{blk}]!\n",
            "vld1.32 {{d2[], d3[]}}, [{blk}]!\n",
            "vld1.32 {{d4[], d5[]}}, [{blk}]!\n",
            "vld1.32 {{d6[], d7[]}}, [{blk}]!\n",
            "vld1.32 {{d8[], d9[]}}, [{blk}]!\n",
            "vld1.32 {{d10[], d11[]}}, [{blk}]\n",
            "vmul.f32 q10, q10, q0\n",
            "vmul.f32 q11, q11, q0\n",
            "vmul.f32 q14, q14, q0\n",
            "vmul.f32 q15, q15, q0\n",
            "vmax.f32 q10, q10, q1\n",
            "vmax.f32 q11, q11, q1\n",
            "vmax.f32 q14, q14, q1\n",
            "vmax.f32 q15, q15, q1\n",
            "vmin.f32 q10, q10, q2\n",
            "vmin.f32 q11, q11, q2\n",
            "vmin.f32 q14, q14, q2\n",
            "vmin.f32 q15, q15, q2\n",
            "vadd.f32 q10, q10, q4\n",
            "vadd.f32 q11, q11, q4\n",
            "vadd.f32 q14, q14, q4\n",
            "vadd.f32 q15, q15, q4\n",
        )
    };
}

/// The end of a block storing f32 values: the pair's value back from its
/// rounding (`QDQ`), then 8 values per channel.
macro_rules! store_f32_text {
    (true) => {
        concat!(
            grid_text!(),
            "vsub.f32 q10, q10, q4\n",
            "vsub.f32 q11, q11, q4\n",
            "vsub.f32 q14, q14, q4\n",
            "vsub.f32 q15, q15, q4\n",
            "vmul.f32 q10, q10, q3\n",
            "vmul.f32 q11, q11, q3\n",
            "vmul.f32 q14, q14, q3\n",
            "vmul.f32 q15, q15, q3\n",
            store_f32_text!(false),
        )
    };
    (false) => {
        concat!("vst1.32 {{d20-d23}}, [{xs}]\n", "vst1.32 {{d28-d31}}, [{ws}]\n")
    };
}

/// The end of a block storing indices: the rounded pattern minus that of
/// the grid's low end, narrowed to 8 bytes per channel.
macro_rules! store_u8_text {
    () => {
        concat!(
            grid_text!(),
            "vsub.i32 q10, q10, q5\n",
            "vsub.i32 q11, q11, q5\n",
            "vsub.i32 q14, q14, q5\n",
            "vsub.i32 q15, q15, q5\n",
            "vmovn.i32 d20, q10\n",
            "vmovn.i32 d21, q11\n",
            "vmovn.i32 d28, q14\n",
            "vmovn.i32 d29, q15\n",
            "vmovn.i16 d20, q10\n",
            "vmovn.i16 d28, q14\n",
            "vst1.8 {{d20}}, [{xs}]\n",
            "vst1.8 {{d28}}, [{ws}]\n",
        )
    };
}

/// One block: the sums of 2 channels by 8 pixels from `xs` (packed, signed)
/// and `ws` (the weights of the first channel's first quad), then the
/// epilogue `$end`, storing where `blk` says.
macro_rules! block {
    ($xs:expr, $ws:expr, $steps:expr, $odd:expr, $skip:expr, $blk:expr, $end:expr) => {
        asm!(
            sums_text!(),
            $end,
            xs = inout(reg) $xs => _,
            ws = inout(reg) $ws => _,
            n = inout(reg) $steps => _,
            odd = inout(reg) $odd => _,
            skip = in(reg) $skip,
            quad = in(reg) 4 * NR,
            blk = inout(reg) $blk => _,
            out("d0") _, out("d1") _, out("d2") _, out("d3") _, out("d4") _, out("d5") _, out("d6") _, out("d7") _,
            out("d8") _, out("d9") _, out("d10") _, out("d11") _, out("d12") _, out("d13") _, out("d14") _, out("d15") _,
            options(nostack),
        )
    };
}

/// [`Int8Conv::run_plain`] with VMULL/VMLAL, on packed quads made signed
/// (`to_signed`): two quads per step for weights in -127..=127
/// ([`Int8Conv::pairs_fit`]), one otherwise.
///
/// # Safety
/// The CPU must have NEON and VFPv4 ([`cpu_has_neon`]); `packed` holds the
/// op's packed, signed input ([`Int8Conv::word_at`] layout, whole blocks),
/// and `out` whole rows of `pixels` values for channels `first..`.
pub(super) unsafe fn run_pairs<T: Out>(op: &Int8Conv, packed: &[u32], out: &mut [T], first: usize) {
    by_epilogue!(run_with, op, packed, out, first)
}

unsafe fn run_with<T: Out, const CLAMP: bool, const QDQ: bool>(
    op: &Int8Conv,
    packed: &[u32],
    out: &mut [T],
    first: usize,
) {
    // Indices (u8) always end in the output pair; f32 values may.
    let index = std::mem::size_of::<T>() == 1;
    assert!(!index || QDQ, "indices need the output's pair");
    let (p, opad, quads) = (op.pixels, op.out_channels + super::MR, op.quads());
    let channels = out.len() / p;
    assert!(packed.len() >= quads * op.padded_pixels());
    op.check_channels(first, channels);
    let qd = op.epi.by_value().qd;
    let mut blk = Block::<T> {
        out: [std::ptr::null_mut(); ROWS],
        chans: [[0; 3]; ROWS],
        clip: [op.epi.clamp.0, op.epi.clamp.1],
        pair: [
            qd.inv_scale.to_bits(),
            qd.lo.to_bits(),
            qd.hi.to_bits(),
            qd.scale.to_bits(),
            ROUND_MAGIC.to_bits(),
            (qd.lo + ROUND_MAGIC).to_bits(),
        ],
    };
    // A block of fewer pixels or channels stores here, then copies.
    let mut spare = [[T::default(); PX]; ROWS];
    let skip = 4 * opad - 4;
    let out = out.as_mut_ptr();
    for px in (0..p).step_by(PX) {
        let n = (p - px).min(PX);
        let xs = packed.as_ptr().add(op.word_at(0, px)) as *const u8;
        let mut o = 0;
        while o < channels {
            let rows = (channels - o).min(ROWS);
            for (r, spare) in spare.iter_mut().enumerate() {
                if r < rows {
                    let c = first + o + r;
                    let (mul, bias) = op.scaling(c);
                    blk.chans[r] = [op.signed_corr(c) as u32, mul.to_bits(), bias.to_bits()];
                    blk.out[r] = if n == PX { out.add((o + r) * p + px) } else { spare.as_mut_ptr() };
                } else {
                    blk.chans[r] = [0; 3];
                    blk.out[r] = spare.as_mut_ptr();
                }
            }
            let ws = op.weights.as_ptr().add(first + o) as *const u8;
            // With a weight of -128, one quad at a time (`single_quads`).
            let (steps, odd) = if op.single_quads { (0, quads) } else { (quads / 2, quads % 2) };
            let b = &mut blk as *mut Block<T>;
            macro_rules! go {
                ($clip:tt, u8) => {
                    block!(xs, ws, steps, odd, skip, b, concat!(clip_text!($clip), store_u8_text!()))
                };
                ($clip:tt, qdq) => {
                    block!(xs, ws, steps, odd, skip, b, concat!(clip_text!($clip), store_f32_text!(true)))
                };
                ($clip:tt, f32) => {
                    block!(xs, ws, steps, odd, skip, b, concat!(clip_text!($clip), store_f32_text!(false)))
                };
            }
            by_store!(go, index, CLAMP, QDQ);
            if n < PX {
                for (r, row) in spare.iter().enumerate().take(rows) {
                    std::ptr::copy_nonoverlapping(row.as_ptr(), out.add((o + r) * p + px), n);
                }
            }
            o += ROWS;
        }
    }
}

/// The input grid's constants in the order [`grid_bytes`] loads them:
/// `inv_scale`, `lo`, `hi`, `ROUND_MAGIC` and the pattern of `lo + ROUND_MAGIC`.
fn grid_consts(op: &Int8Conv) -> [u32; 5] {
    let qd = op.input;
    [qd.inv_scale.to_bits(), qd.lo.to_bits(), qd.hi.to_bits(), ROUND_MAGIC.to_bits(), (qd.lo + ROUND_MAGIC).to_bits()]
}

/// `16 * chunks` values from `src` as their indices on the input grid, one
/// byte each, into `dst`: [`Int8Conv::grid_index`]'s arithmetic (the
/// rounded value's pattern minus that of the grid's low end).
///
/// # Safety
/// NEON as for [`run_pairs`]; `src` readable and `dst` writable for
/// `16 * chunks` values, `chunks >= 1`.
unsafe fn grid_bytes(src: *const f32, dst: *mut u8, chunks: usize, consts: &[u32; 5]) {
    asm!(
        ".fpu neon-vfpv4",
        "vld1.32 {{d0[], d1[]}}, [{c}]!",
        "vld1.32 {{d2[], d3[]}}, [{c}]!",
        "vld1.32 {{d4[], d5[]}}, [{c}]!",
        "vld1.32 {{d6[], d7[]}}, [{c}]!",
        "vld1.32 {{d8[], d9[]}}, [{c}]",
        "2:",
        "vld1.32 {{d16-d19}}, [{src}]!",
        "vld1.32 {{d20-d23}}, [{src}]!",
        "vmul.f32 q8, q8, q0",
        "vmul.f32 q9, q9, q0",
        "vmul.f32 q10, q10, q0",
        "vmul.f32 q11, q11, q0",
        "vmax.f32 q8, q8, q1",
        "vmax.f32 q9, q9, q1",
        "vmax.f32 q10, q10, q1",
        "vmax.f32 q11, q11, q1",
        "vmin.f32 q8, q8, q2",
        "vmin.f32 q9, q9, q2",
        "vmin.f32 q10, q10, q2",
        "vmin.f32 q11, q11, q2",
        "vadd.f32 q8, q8, q3",
        "vadd.f32 q9, q9, q3",
        "vadd.f32 q10, q10, q3",
        "vadd.f32 q11, q11, q3",
        "vsub.i32 q8, q8, q4",
        "vsub.i32 q9, q9, q4",
        "vsub.i32 q10, q10, q4",
        "vsub.i32 q11, q11, q4",
        "vmovn.i32 d16, q8",
        "vmovn.i32 d17, q9",
        "vmovn.i32 d18, q10",
        "vmovn.i32 d19, q11",
        "vmovn.i16 d16, q8",
        "vmovn.i16 d17, q9",
        "vst1.8 {{d16, d17}}, [{dst}]!",
        "subs {n}, {n}, #1",
        "bne 2b",
        src = inout(reg) src => _,
        dst = inout(reg) dst => _,
        n = inout(reg) chunks => _,
        c = inout(reg) consts.as_ptr() => _,
        out("d0") _, out("d1") _, out("d2") _, out("d3") _, out("d4") _, out("d5") _, out("d6") _, out("d7") _,
        out("d8") _, out("d9") _,
        options(nostack),
    );
}

/// All of `x` as indices on the op's input grid into `dst` (resized to
/// `x.len()` plus 32 bytes, which later 16-byte reads may cross).
fn to_indices(op: &Int8Conv, x: &[f32], dst: &mut Vec<u8>) {
    let whole = x.len() / 16 * 16;
    dst.clear();
    dst.resize(x.len() + 32, 0);
    if whole > 0 {
        // SAFETY: the loops run only when the CPU has NEON (`with_isa`);
        // both sides hold `whole` values.
        unsafe { grid_bytes(x.as_ptr(), dst.as_mut_ptr(), whole / 16, &grid_consts(op)) };
    }
    for (b, &v) in dst[whole..x.len()].iter_mut().zip(&x[whole..]) {
        *b = Int8Conv::grid_index(op.input, v) as u8;
    }
}

thread_local! {
    /// A 1x1 convolution's values as indices, before they are packed: kept
    /// by each thread between inferences, so that running allocates nothing.
    static INDICES: std::cell::RefCell<Vec<u8>> = const { std::cell::RefCell::new(Vec::new()) };
}

/// Interleaves 16 bytes from each of four rows into 16 words (byte `j` of
/// word `i` from row `j`'s byte `i`), each byte's top bit flipped
/// ([`super::to_signed`]). A stride of 2 takes every other byte of 32.
///
/// # Safety
/// NEON as for [`run_pairs`]; each row readable for `16 * stride` bytes,
/// `dst` writable for 16 words; `stride` is 1 or 2.
unsafe fn interleave(rows: [*const u8; 4], stride: usize, dst: *mut u32) {
    macro_rules! go {
        ($($load:literal),*) => {
            asm!(
                ".fpu neon",
                "vmov.i8 q10, #0x80",
                $($load,)*
                "vst4.8 {{d0, d2, d4, d6}}, [{dst}]!",
                "vst4.8 {{d1, d3, d5, d7}}, [{dst}]",
                r0 = inout(reg) rows[0] => _,
                r1 = inout(reg) rows[1] => _,
                r2 = inout(reg) rows[2] => _,
                r3 = inout(reg) rows[3] => _,
                dst = inout(reg) dst => _,
                out("d0") _, out("d1") _, out("d2") _, out("d3") _, out("d4") _, out("d5") _, out("d6") _, out("d7") _,
                options(nostack),
            )
        };
    }
    if stride == 1 {
        go!(
            "vld1.8 {{d0, d1}}, [{r0}]",
            "veor q0, q0, q10",
            "vld1.8 {{d2, d3}}, [{r1}]",
            "veor q1, q1, q10",
            "vld1.8 {{d4, d5}}, [{r2}]",
            "veor q2, q2, q10",
            "vld1.8 {{d6, d7}}, [{r3}]",
            "veor q3, q3, q10"
        );
    } else {
        // `vld2` splits even and odd bytes: two loads of 16 give the 16
        // even ones in q8 (the odd ones in q9, unused).
        go!(
            "vld2.8 {{d16, d18}}, [{r0}]!",
            "vld2.8 {{d17, d19}}, [{r0}]",
            "veor q0, q8, q10",
            "vld2.8 {{d16, d18}}, [{r1}]!",
            "vld2.8 {{d17, d19}}, [{r1}]",
            "veor q1, q8, q10",
            "vld2.8 {{d16, d18}}, [{r2}]!",
            "vld2.8 {{d17, d19}}, [{r2}]",
            "veor q2, q8, q10",
            "vld2.8 {{d16, d18}}, [{r3}]!",
            "vld2.8 {{d17, d19}}, [{r3}]",
            "veor q3, q8, q10"
        );
    }
}

/// Packs a 1x1 convolution's input as [`Int8Conv::pack_plain`] (or
/// `pack_plain_indices`) does, then [`super::to_signed`]: rows of indices
/// (made here from values, at 16 per step) interleaved 16 pixels of four
/// channels at a time.
pub(super) fn pack_signed(op: &Int8Conv, x: super::Input, packed: &mut [u32]) {
    let (k, p, pp) = (op.in_channels, op.pixels, op.padded_pixels());
    assert!(packed.len() >= op.quads() * pp);
    let mut own = INDICES.take();
    let rows: &[u8] = match x {
        super::Input::Values(v) => {
            to_indices(op, v, &mut own);
            &own
        }
        super::Input::Indices(b) => b,
    };
    assert!(rows.len() >= k * p);
    let zero = [0u8; 32];
    let mut tail = [[0u8; 16]; 4];
    for quad in 0..op.quads() {
        for px in (0..pp).step_by(16) {
            let ptrs: [*const u8; 4] = std::array::from_fn(|j| {
                let ch = 4 * quad + j;
                let at = ch * p + px;
                if ch >= k || px >= p {
                    zero.as_ptr()
                } else if at + 16 <= rows.len() {
                    rows[at..].as_ptr()
                } else {
                    let n = rows.len() - at;
                    tail[j][..n].copy_from_slice(&rows[at..]);
                    tail[j].as_ptr()
                }
            });
            let at = op.word_at(quad, px);
            assert!(at + 16 <= packed.len());
            // SAFETY: each row pointer has 16 readable bytes (checked
            // above), the 16 words are inside `packed` (16 divides NR).
            unsafe { interleave(ptrs, 1, packed.as_mut_ptr().add(at)) };
        }
    }
    INDICES.set(own);
}

/// [`Int8Conv::fill_planes`], the values converted 16 at a time.
pub(super) fn fill_planes(op: &Int8Conv, g: &super::Im2col, x: &[f32], bytes: &mut Vec<u8>) {
    let ([h, w], [pt, pl]) = (g.in_hw, g.pad);
    let (hp, wp) = Int8Conv::planes_hw(g);
    let mut own = INDICES.take();
    to_indices(op, x, &mut own);
    bytes.clear();
    bytes.resize(op.in_channels * hp * wp, (-op.input.lo) as u8);
    for (plane, channel) in bytes.chunks_exact_mut(hp * wp).zip(own.chunks_exact(h * w)) {
        for (row, line) in plane[pt * wp..].chunks_exact_mut(wp).zip(channel.chunks_exact(w)) {
            row[pl..pl + w].copy_from_slice(line);
        }
    }
    INDICES.set(own);
}

/// [`Int8Conv::pack_im2col`] then [`super::to_signed`], 16 pixels of a row
/// at a time for strides 1 and 2 ([`interleave`]), the rest byte by byte.
pub(super) fn pack_im2col_signed(op: &Int8Conv, g: &super::Im2col, bytes: &[u8], packed: &mut [u32]) {
    let depth = op.depth();
    let ([sh, sw], [ho, wo]) = (g.strides, g.out_hw);
    let (_, wp) = Int8Conv::planes_hw(g);
    let last = (ho - 1) * sh * wp + (wo - 1) * sw + g.offsets[depth - 1];
    assert!(last < bytes.len() && packed.len() >= op.quads() * op.padded_pixels());
    let mut spare = [0u32; 16];
    op.im2col_runs(g, packed, |packed, o, start, at, n| {
        let far = o.iter().max().copied().unwrap_or(0);
        let mut i = 0;
        // Vectors whose reads (16 * sw bytes per tap) stay inside the
        // planes. One of fewer pixels writes 16 words all the same when they
        // stay in this block's run of the quad (the words past the row are
        // the next rows' pixels, packed later, or padding), else it goes
        // through `spare`.
        while i < n && (sw == 1 || sw == 2) && start + (i + 16) * sw + far <= bytes.len() {
            let pos = start + i * sw;
            let direct = i + 16 <= n || (at + i) % NR + 16 <= NR;
            let dst = if direct { packed[at + i..at + i + 16].as_mut_ptr() } else { spare.as_mut_ptr() };
            // SAFETY: the reads end at `pos + 16 * sw + far`, checked
            // above; `dst` holds 16 words.
            unsafe { interleave(o.map(|off| bytes.as_ptr().add(pos + off)), sw, dst) };
            if !direct {
                packed[at + i..at + n].copy_from_slice(&spare[..n - i]);
            }
            i += 16;
        }
        let i = i.min(n);
        for (j, word) in packed[at + i..at + n].iter_mut().enumerate() {
            let pos = start + (i + j) * sw;
            let get = |off: usize| bytes[pos + off] as u32;
            *word = (get(o[0]) | get(o[1]) << 8 | get(o[2]) << 16 | get(o[3]) << 24) ^ 0x8080_8080;
        }
    });
}
