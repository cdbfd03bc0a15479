//! Int8 convolutions of our own, `EdgeinferConvInt8`, for QDQ models:
//! integer multiply-adds, with the bias, a clip and the output's
//! quantize/dequantize pair in the same pass; one packing and epilogue, and
//! block loops per instruction set ([`Isa`]: here the scalar reference and
//! AVX-512 VNNI, in `int8_avx2.rs` AVX2 and AVX-VNNI, in `int8_neon.rs`
//! aarch64 SMLAL and SDOT).
//!
//! tract runs a QDQ model's convolutions on float kernels: its decluttered
//! graph holds the weights dequantized, and the activations as f32 values
//! rounded onto their quantization grid. Both are still integers times a
//! step, so a convolution whose input comes straight from a
//! quantize/dequantize pair, and whose weights are whole multiples of one
//! step per output channel, can be computed exactly in integers:
//! `sum(w * x) = s_w * s_x * sum(q_w * n_x)`. VNNI's `vpdpbusd` does 64 of
//! those 8-bit multiply-adds per instruction where an AVX-512 FMA does 16
//! float ones.
//!
//! Each inference packs the input once: every value back to its grid index
//! (`n - lo`, 0..=255, so unsigned as VNNI wants it), four input values of
//! an output pixel's sum in one 32-bit word: four input channels for a 1x1
//! convolution (tract's `EinSum`), four kernel taps of the im2col matrix
//! (padding as the grid index of zero) for any other (`Conv`, 1-D or 2-D,
//! any stride, dilation and padding, one group). Then blocks of 8 output
//! channels by 32 pixels are summed in 16 registers, starting from the
//! shifted zero's correction (`lo` times the weights' sum, an integer),
//! scaled to f32 and stored through the epilogue (the other rungs sum
//! smaller blocks the same way; docs/int8-kernels.md). The integer sums are
//! exact, so a value can differ from tract's float sums in its last bits,
//! and after the output's rounding by one quantization step, rarely.
//!
//! [`use_for_int8_convs`] swaps tract's operators, and what follows them,
//! for this one before code generation, where the rung in use measured
//! faster than tract's float kernels ([`Isa::int8_in_graphs`]: AVX-VNNI,
//! AVX-512 VNNI, SMLAL, SDOT). Every rung gives the scalar loops' bits, which the
//! tests check on each rung the CPU has.

use std::sync::Arc;

use tract_core::internal::{
    AxisOp, DatumType, DatumTypeExt, EvalContext, EvalOp, InOut, Op, OutletId, StaticName, TValue, TVec, TractResult,
    TypedFact, TypedModel, TypedModelPatch, TypedNode, TypedOp,
};
use tract_core::ops::cnn::{Conv, KernelFormat, PaddingSpec};
use tract_core::ops::einsum::EinSum;
use tract_core::ops::nn::DataFormat;

use super::depthwise::Depthwise;
use super::dyn_quant::{DynQuantDequant, Grid};
#[cfg(target_arch = "x86_64")]
use super::epilogue::avx512::Regs;
use super::epilogue::{const_f32, eval_into, output_fact, same_bits, swap_in_from, Applied, Epilogue, Folded};
use super::isa::Isa;
use super::quant_dequant::{QuantDequant, ROUND_MAGIC};
#[cfg(target_arch = "x86_64")]
use std::arch::x86_64::{
    __m512, __m512i, __mmask16, _mm512_mask_cvtepi32_storeu_epi8, _mm512_mask_i32scatter_ps, _mm512_mask_storeu_ps,
    _mm512_storeu_si512,
};

/// The op name tract's plan (and `inspect`'s operator counts) show.
pub const OP_NAME: &str = "EdgeinferConvInt8";

/// Output channels summed together: one broadcast weight word each.
const MR: usize = 8;

// The VNNI block's epilogue is written out row by row for 8 rows.
const _: () = assert!(MR == 8);

/// Pixels summed together: two AVX-512 registers of 16 sums.
const NR: usize = 32;

/// Fewer output pixels than this are summed with the output channels across
/// a register's lanes instead ([`vnni::run_small`]): blocks of 32 pixels
/// would compute mostly padding (a 2x2 output 8 times its work, a classifier
/// 32 times).
#[cfg(target_arch = "x86_64")]
const SMALL: usize = 16;

/// Where the values of a convolution other than a 1x1 of stride 1 come from: a 1-D
/// convolution is one of height 1.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Im2col {
    in_hw: [usize; 2],
    kernel: [usize; 2],
    strides: [usize; 2],
    dilations: [usize; 2],
    /// Zero padding before: top, left (after is what the output size leaves).
    pad: [usize; 2],
    out_hw: [usize; 2],
    /// Per tap (input channel, then kernel row and column; whole quads), where
    /// it reads in the padded planes relative to its output pixel's first
    /// value. Taps past the depth read the first one, times a zero weight.
    /// Shared: a dynamically quantized operator is copied at each inference
    /// ([`Int8Conv::on_grid_of`]), which must not copy these.
    offsets: Arc<[usize]>,
}

impl Im2col {
    /// The geometry with its taps' offsets filled in, for `c` input channels.
    fn with_offsets(mut self, c: usize) -> Im2col {
        let (hp, wp) = Int8Conv::planes_hw(&self);
        let ([kh, kw], [dh, dw]) = (self.kernel, self.dilations);
        let depth = c * kh * kw;
        self.offsets = (0..depth.next_multiple_of(4))
            .map(|t| {
                let t = if t < depth { t } else { 0 };
                let (ch, dy, dx) = (t / (kh * kw), t / kw % kh, t % kw);
                ch * hp * wp + dy * dh * wp + dx * dw
            })
            .collect();
        self
    }
}

/// A convolution of one `[C, ...]` or `[1, C, ...]` f32 tensor whose values
/// lie on the grid `input`, into `O` channels of `pixels` values: the
/// integer sums, then `* mul + bias`, `clamp(lo, hi)` and optionally a
/// quantize/dequantize pair.
#[derive(Debug, Clone)]
pub struct Int8Conv {
    in_channels: usize,
    out_channels: usize,
    /// Output values per channel.
    pixels: usize,
    /// The kernel's geometry; `None` for a 1x1 convolution of stride 1 (the
    /// packed words are then read straight from the input's channels).
    im2col: Option<Im2col>,
    /// The quantize/dequantize pair that produced the input: its grid.
    input: QuantDequant,
    /// Integer weights, four of an output channel's per word (little-endian
    /// bytes, in the order of the packed input), `[ceil(depth / 4)][O + MR]`,
    /// zero past the depth and `O` so that blocks read whole.
    weights: Arc<[u32]>,
    /// Per output channel: `lo` times the sum of its integer weights, added
    /// back because the packed input counts from `lo`, not from zero.
    corr: Arc<[i32]>,
    /// Per output channel: the sum of its integer weights, for the
    /// correction of kernels that count the input from `lo + 128`
    /// (`corr + 128 * wsum`).
    wsum: Arc<[i32]>,
    /// Per output channel: the input's step times the weights' step.
    mul: Arc<[f32]>,
    /// One bias per output channel.
    bias: Arc<[f32]>,
    epi: Epilogue,
    /// The kernels this operator runs ([`Isa`]): the block loops, and the
    /// packing they read.
    isa: Isa,
    /// The weights as i16 for the kernels that widen to 16 bits: for the
    /// SMLAL loops ([`Isa::Neon`]) `[4 * quads][O + MR]`, for AVX2's
    /// ([`Isa::Avx2`]) as `avx2::split_weights` lays them out; empty otherwise.
    weights16: Arc<[i16]>,
    /// Whether the 32-bit ARM loops multiply one quad at a time: a weight
    /// of -128 would overflow the 16-bit sum of two quads' products.
    single_quads: bool,
    /// Whether the input is each value's index on [`Self::input`] (`u8`,
    /// from a depthwise operator) instead of the f32 value; 1x1 only.
    input_u8: bool,
    /// Whether the output is each value's index on the output pair's grid
    /// (`u8`, for a depthwise operator that reads them: a quarter of the
    /// memory traffic) instead of the f32 value.
    out_u8: bool,
    /// Whether the input's grid is picked per inference from its values, as
    /// DynamicQuantizeLinear picks it (dynamically quantized models): `input`
    /// is then [`DYNAMIC_PLACEHOLDER`], `corr` zero and `mul` the weights'
    /// steps, and each inference fills them in ([`Self::on_grid_of`]).
    dynamic: bool,
    out_shape: TVec<usize>,
}

/// The input grid of a [`Int8Conv::dynamic`] operator until an inference
/// knows it: step 1 from index 0, so that `mul` holds the weights' steps.
const DYNAMIC_PLACEHOLDER: QuantDequant = QuantDequant { scale: 1.0, inv_scale: 1.0, lo: 0.0, hi: 255.0 };

impl PartialEq for Int8Conv {
    fn eq(&self, other: &Self) -> bool {
        self.in_channels == other.in_channels
            && self.out_channels == other.out_channels
            && self.pixels == other.pixels
            && self.im2col == other.im2col
            && self.input == other.input
            && self.weights == other.weights
            && self.corr == other.corr
            && self.wsum == other.wsum
            && self.isa == other.isa
            && self.weights16 == other.weights16
            && self.single_quads == other.single_quads
            && same_bits(&self.mul, &other.mul)
            && same_bits(&self.bias, &other.bias)
            && self.epi == other.epi
            && self.input_u8 == other.input_u8
            && self.out_u8 == other.out_u8
            && self.dynamic == other.dynamic
            && self.out_shape == other.out_shape
    }
}

// Equality is on bit patterns, an equivalence even for NaN.
impl Eq for Int8Conv {}

/// What [`Int8Conv`] reads: f32 values on its input grid, or their indices
/// on it ([`Int8Conv::input_u8`]).
#[derive(Clone, Copy)]
enum Input<'a> {
    Values(&'a [f32]),
    Indices(&'a [u8]),
}

/// What [`Int8Conv`] stores: f32 values, or their indices on the output
/// pair's grid (`u8`, [`Int8Conv::out_u8`]).
pub(super) trait Out: Copy + Default + Send + Sync + 'static {
    /// `v` (a sum scaled and biased) through the epilogue, as stored.
    fn plain(epi: &Epilogue, v: f32) -> Self;

    /// As [`Self::plain`], with the clip and the pair as constants for hot loops.
    #[cfg_attr(not(target_arch = "x86_64"), allow(dead_code))]
    fn make<const CLAMP: bool, const QDQ: bool>(epi: Applied, v: f32) -> Self;

    /// Stores lanes `m` of `v` (sums scaled and biased) through the
    /// epilogue, at `ptr` on.
    #[cfg(target_arch = "x86_64")]
    unsafe fn store<const CLAMP: bool, const QDQ: bool>(regs: Regs, ptr: *mut Self, m: __mmask16, v: __m512);

    /// Stores the first `n` of the 8 values in `v` (sums scaled and biased)
    /// through the epilogue in `regs`, at `ptr` on.
    #[cfg(target_arch = "aarch64")]
    unsafe fn store_neon<const CLAMP: bool, const QDQ: bool>(
        regs: &neon::Regs,
        v: [std::arch::aarch64::float32x4_t; 2],
        ptr: *mut Self,
        n: usize,
    );

    /// As [`Self::store`], lane `l` at `base + stride[l]`.
    #[cfg(target_arch = "x86_64")]
    unsafe fn scatter<const CLAMP: bool, const QDQ: bool>(
        regs: Regs,
        base: *mut Self,
        m: __mmask16,
        stride: __m512i,
        v: __m512,
    );
}

impl Out for f32 {
    fn plain(epi: &Epilogue, v: f32) -> f32 {
        epi.apply(v)
    }

    #[inline(always)]
    fn make<const CLAMP: bool, const QDQ: bool>(epi: Applied, v: f32) -> f32 {
        epi.apply::<CLAMP, QDQ>(v)
    }

    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx512f")]
    unsafe fn store<const CLAMP: bool, const QDQ: bool>(regs: Regs, ptr: *mut f32, m: __mmask16, v: __m512) {
        _mm512_mask_storeu_ps(ptr, m, regs.apply::<CLAMP, QDQ>(v))
    }

    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx512f")]
    unsafe fn scatter<const CLAMP: bool, const QDQ: bool>(
        regs: Regs,
        base: *mut f32,
        m: __mmask16,
        stride: __m512i,
        v: __m512,
    ) {
        _mm512_mask_i32scatter_ps::<4>(base, m, stride, regs.apply::<CLAMP, QDQ>(v))
    }

    #[cfg(target_arch = "aarch64")]
    #[inline(always)]
    unsafe fn store_neon<const CLAMP: bool, const QDQ: bool>(
        regs: &neon::Regs,
        v: [std::arch::aarch64::float32x4_t; 2],
        ptr: *mut f32,
        n: usize,
    ) {
        neon::store_first_f32(v.map(|v| regs.apply::<CLAMP, QDQ>(v)), ptr, n)
    }
}

impl Out for u8 {
    fn plain(epi: &Epilogue, v: f32) -> u8 {
        epi.index(v)
    }

    #[inline(always)]
    fn make<const CLAMP: bool, const QDQ: bool>(epi: Applied, v: f32) -> u8 {
        epi.index::<CLAMP>(v)
    }

    #[cfg(target_arch = "aarch64")]
    #[inline(always)]
    unsafe fn store_neon<const CLAMP: bool, const QDQ: bool>(
        regs: &neon::Regs,
        v: [std::arch::aarch64::float32x4_t; 2],
        ptr: *mut u8,
        n: usize,
    ) {
        use std::arch::aarch64::{vcombine_u16, vmovn_u16, vmovn_u32};
        let [lo, hi] = v.map(|v| vmovn_u32(regs.index::<CLAMP>(v)));
        neon::store_first_u8(vmovn_u16(vcombine_u16(lo, hi)), ptr, n)
    }

    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx512f")]
    unsafe fn store<const CLAMP: bool, const QDQ: bool>(regs: Regs, ptr: *mut u8, m: __mmask16, v: __m512) {
        _mm512_mask_cvtepi32_storeu_epi8(ptr as *mut _, m, regs.index::<CLAMP>(v))
    }

    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx512f")]
    unsafe fn scatter<const CLAMP: bool, const QDQ: bool>(
        regs: Regs,
        base: *mut u8,
        m: __mmask16,
        stride: __m512i,
        v: __m512,
    ) {
        // No byte scatter: lane by lane (only small outputs come here).
        let (mut idx, mut at) = ([0i32; 16], [0i32; 16]);
        _mm512_storeu_si512(idx.as_mut_ptr() as *mut _, regs.index::<CLAMP>(v));
        _mm512_storeu_si512(at.as_mut_ptr() as *mut _, stride);
        for l in (0..16).filter(|l| m & (1 << l) != 0) {
            *base.add(at[l] as usize) = idx[l] as u8;
        }
    }
}

impl Int8Conv {
    /// Input values per output value: the input channels times the kernel's taps.
    fn depth(&self) -> usize {
        self.in_channels * self.im2col.as_ref().map_or(1, |g| g.kernel[0] * g.kernel[1])
    }

    /// Input values per input channel.
    fn in_pixels(&self) -> usize {
        self.im2col.as_ref().map_or(self.pixels, |g| g.in_hw[0] * g.in_hw[1])
    }

    /// Quads of the depth: the packed input's and the weights' rows.
    fn quads(&self) -> usize {
        self.depth().div_ceil(4)
    }

    /// Pixels packed: whole blocks of `NR`.
    fn padded_pixels(&self) -> usize {
        self.pixels.next_multiple_of(NR)
    }

    /// Where the word of channel quad `quad` at pixel `px` is packed: by
    /// blocks of `NR` pixels, each holding all its quads, so that a block's
    /// sums read one contiguous run of memory.
    #[inline(always)]
    fn word_at(&self, quad: usize, px: usize) -> usize {
        (px / NR * self.quads() + quad) * NR + px % NR
    }

    /// The grid this operator's output lies on, when it ends in a pair.
    pub fn output_grid(&self) -> Option<QuantDequant> {
        self.epi.qdq
    }

    /// `v`'s index on the input grid counted from `lo`: the pair's own
    /// arithmetic, so a value it produced comes back to the integer it was.
    #[inline(always)]
    fn grid_index(qd: QuantDequant, v: f32) -> u32 {
        let q = v * qd.inv_scale;
        let q = if q < qd.lo { qd.lo } else { q };
        let q = if q > qd.hi { qd.hi } else { q };
        (((q + ROUND_MAGIC) - ROUND_MAGIC) - qd.lo) as u32
    }

    /// Packs `x` (`[K][P]`) into `packed` (ceil(K / 4) x padded P words, [`Self::word_at`]).
    /// Packs indices `x` (`[K][P]`) as [`Self::pack_plain`] packs the values they stand for.
    #[inline(always)]
    fn pack_plain_indices(&self, x: &[u8], packed: &mut [u32]) {
        self.pack_rows(packed, |ch, from, to| {
            for (word, &n) in to.iter_mut().zip(&x[ch * self.pixels + from..]) {
                *word |= (n as u32) << (8 * (ch % 4));
            }
        })
    }

    #[inline(always)]
    fn pack_plain(&self, x: &[f32], packed: &mut [u32]) {
        let qd = self.input;
        self.pack_rows(packed, |ch, from, to| {
            for (word, &v) in to.iter_mut().zip(&x[ch * self.pixels + from..]) {
                *word |= Self::grid_index(qd, v) << (8 * (ch % 4));
            }
        })
    }

    /// Zeroes `packed` and calls `or_in(channel, first pixel, words)` for
    /// each input channel and block of `NR` pixels, with the block's words of
    /// that channel's quad (as many as the block has pixels): contiguous runs,
    /// which the compiler vectorises.
    #[inline(always)]
    fn pack_rows(&self, packed: &mut [u32], mut or_in: impl FnMut(usize, usize, &mut [u32])) {
        let (k, p) = (self.in_channels, self.pixels);
        packed.fill(0);
        for ch in 0..k {
            for from in (0..p).step_by(NR) {
                let at = self.word_at(ch / 4, from);
                or_in(ch, from, &mut packed[at..at + (p - from).min(NR)]);
            }
        }
    }

    /// The zero-padded planes [`Self::pack_im2col`] reads: height, width.
    fn planes_hw(g: &Im2col) -> (usize, usize) {
        let ([h, w], [kh, kw], [sh, sw], [dh, dw], [pt, pl], [ho, wo]) =
            (g.in_hw, g.kernel, g.strides, g.dilations, g.pad, g.out_hw);
        // As far as the last output's taps reach, and at least the input.
        let hp = ((ho - 1) * sh + (kh - 1) * dh + 1).max(pt + h);
        let wp = ((wo - 1) * sw + (kw - 1) * dw + 1).max(pl + w);
        (hp, wp)
    }

    /// Fills `bytes` with the input's grid indices in zero-padded planes
    /// (padding is the value 0, at index `-lo`).
    #[inline(always)]
    fn fill_planes(&self, g: &Im2col, x: &[f32], bytes: &mut Vec<u8>) {
        let ([h, w], [pt, pl]) = (g.in_hw, g.pad);
        let (hp, wp) = Self::planes_hw(g);
        let qd = self.input;
        bytes.clear();
        bytes.resize(self.in_channels * hp * wp, (-qd.lo) as u8);
        for (plane, channel) in bytes.chunks_exact_mut(hp * wp).zip(x.chunks_exact(h * w)) {
            for (row, line) in plane[pt * wp..].chunks_exact_mut(wp).zip(channel.chunks_exact(w)) {
                for (b, &v) in row[pl..pl + w].iter_mut().zip(line) {
                    *b = Self::grid_index(qd, v) as u8;
                }
            }
        }
    }

    /// Packs the im2col matrix of the planes in `bytes` ([`Self::fill_planes`])
    /// for `g` into `packed`: four kernel taps of each output pixel to a
    /// word, read at fixed offsets with no border cases. Plain loops,
    /// compiled for AVX-512 too (`pack_im2col_avx512`).
    #[inline(always)]
    fn pack_im2col(&self, g: &Im2col, bytes: &[u8], packed: &mut [u32]) {
        let depth = self.depth();
        let ([sh, sw], [ho, wo]) = (g.strides, g.out_hw);
        let (_, wp) = Self::planes_hw(g);
        let src = bytes;
        // The farthest read: the last pixel's last tap, inside the planes by
        // their size. Checked once, so the loop below reads unchecked.
        let last = (ho - 1) * sh * wp + (wo - 1) * sw + g.offsets[depth - 1];
        assert!(last < src.len(), "{OP_NAME}: im2col read {last} of {}", src.len());
        let get = |at: usize| -> u32 {
            debug_assert!(at <= last);
            // SAFETY: every `at` is a pixel's position plus a tap's offset, at most `last`.
            unsafe { *src.get_unchecked(at) as u32 }
        };
        self.im2col_runs(g, packed, |packed, [o0, o1, o2, o3], start, at, n| {
            let words = &mut packed[at..at + n];
            if sw == 1 {
                // Contiguous reads: the compiler vectorises this form.
                for (i, word) in words.iter_mut().enumerate() {
                    let pos = start + i;
                    *word = get(pos + o0) | get(pos + o1) << 8 | get(pos + o2) << 16 | get(pos + o3) << 24;
                }
            } else {
                for (i, word) in words.iter_mut().enumerate() {
                    let pos = start + i * sw;
                    *word = get(pos + o0) | get(pos + o1) << 8 | get(pos + o2) << 16 | get(pos + o3) << 24;
                }
            }
        });
    }

    /// The walk every im2col packing makes: for each quad of taps and each
    /// stretch of an output row inside one block of `NR` pixels (up to the
    /// end of the row or of the block, whichever is first),
    /// `f(packed, the quad's four tap offsets, the plane position of the
    /// stretch's first pixel, its first word, its pixels)`; then each quad's
    /// words past the last pixel are zeroed (any value would do: never stored).
    #[inline(always)]
    fn im2col_runs(
        &self,
        g: &Im2col,
        packed: &mut [u32],
        mut f: impl FnMut(&mut [u32], [usize; 4], usize, usize, usize),
    ) {
        let ([sh, sw], [ho, wo]) = (g.strides, g.out_hw);
        let (_, wp) = Self::planes_hw(g);
        for quad in 0..self.quads() {
            let o: [usize; 4] = g.offsets[4 * quad..4 * quad + 4].try_into().expect("whole quads");
            for oy in 0..ho {
                let row = oy * sh * wp;
                let mut ox = 0;
                while ox < wo {
                    let px = oy * wo + ox;
                    let n = (wo - ox).min(NR - px % NR);
                    f(packed, o, row + ox * sw, self.word_at(quad, px), n);
                    ox += n;
                }
            }
            let p = self.pixels;
            if !p.is_multiple_of(NR) {
                let at = self.word_at(quad, p);
                packed[at..at + NR - p % NR].fill(0);
            }
        }
    }

    /// Output channels `first..first + out.len() / P` from `packed`, as plain loops.
    fn run_plain<T: Out>(&self, packed: &[u32], out: &mut [T], first: usize) {
        let (p, opad) = (self.pixels, self.out_channels + MR);
        for (i, row) in out.chunks_exact_mut(p).enumerate() {
            let o = first + i;
            for (px, y) in row.iter_mut().enumerate() {
                let mut acc = 0i32;
                for quad in 0..self.quads() {
                    let xw = packed[self.word_at(quad, px)].to_le_bytes();
                    let ww = self.weights[quad * opad + o].to_le_bytes();
                    for j in 0..4 {
                        acc += xw[j] as i32 * ww[j] as i8 as i32;
                    }
                }
                let v = ((acc + self.corr[o]) as f32).mul_add(self.mul[o], self.bias[o]);
                *y = T::plain(&self.epi, v);
            }
        }
    }

    /// Output channel `o`'s scale and bias, for the block loops' epilogues.
    /// The loops check their channel range against the arrays once
    /// ([`Self::check_channels`]), so no check per row is needed here.
    ///
    /// # Safety
    /// `o < self.out_channels`, and the arrays hold a value per channel.
    #[cfg(any(target_arch = "aarch64", target_arch = "x86_64", target_arch = "arm"))]
    #[inline(always)]
    unsafe fn scaling(&self, o: usize) -> (f32, f32) {
        (*self.mul.get_unchecked(o), *self.bias.get_unchecked(o))
    }

    /// The correction of kernels whose packed input counts from `lo + 128`
    /// (signed bytes: the 32-bit ARM rung; the aarch64 blocks compute it in
    /// their assembly) for output channel `o`, without
    /// bounds checks: see [`Self::scaling`].
    ///
    /// # Safety
    /// As for [`Self::scaling`].
    #[cfg(target_arch = "arm")]
    #[inline(always)]
    unsafe fn signed_corr(&self, o: usize) -> i32 {
        *self.corr.get_unchecked(o) + 128 * *self.wsum.get_unchecked(o)
    }

    /// Asserts that channels `first..first + channels` have their
    /// per-channel values: what [`Self::scaling`] relies on.
    #[cfg(any(target_arch = "aarch64", target_arch = "x86_64", target_arch = "arm"))]
    fn check_channels(&self, first: usize, channels: usize) {
        let end = first + channels;
        assert!(end <= self.out_channels);
        assert!(self.mul.len() >= end && self.bias.len() >= end && self.corr.len() >= end && self.wsum.len() >= end);
    }

    /// Whether no weight is -128, so that two products of a signed input
    /// byte and a weight add up within 16 bits (`neon::run_pairs`, `arm32::run_pairs`).
    #[cfg(any(target_arch = "aarch64", target_arch = "arm"))]
    fn pairs_fit(&self) -> bool {
        self.weights.iter().all(|w| w.to_le_bytes().iter().all(|&b| b != 0x80))
    }

    /// A [`Self::dynamic`] operator for the input `x`: on the grid
    /// DynamicQuantizeLinear picks for it, its corrections and scales
    /// made for that grid.
    fn on_grid_of(&self, x: &[f32]) -> Int8Conv {
        // All zeros (or only NaNs): no range; step 1 from zero holds the
        // zeros exactly (index 0 is the value 0).
        let grid = Grid::of(x).unwrap_or(Grid { scale: 1.0, zero_point: 0 });
        let lo = -(grid.zero_point as f32);
        let input = QuantDequant { scale: grid.scale, inv_scale: 1.0 / grid.scale, lo, hi: 255.0 + lo };
        Int8Conv {
            input,
            corr: self.wsum.iter().map(|&s| lo as i32 * s).collect(),
            mul: self.mul.iter().map(|&m| m * grid.scale).collect(),
            dynamic: false,
            ..self.clone()
        }
    }

    /// This operator running the kernels of `isa`, which this CPU must have.
    pub fn with_isa(&self, isa: Isa) -> Int8Conv {
        assert!(isa.cpu_has(), "{OP_NAME}: this CPU cannot run the {isa} kernels");
        #[cfg(target_arch = "x86_64")]
        if isa == Isa::Avx2 {
            let weights16 = avx2::split_weights(&self.weights, self.out_channels + MR).into();
            return Int8Conv { isa, weights16, ..self.clone() };
        }
        // 32-bit ARM has no widened loops: with a weight of -128 its loops
        // take one quad at a time.
        #[cfg(target_arch = "arm")]
        let single_quads = isa == Isa::Neon && !self.pairs_fit();
        #[cfg(not(target_arch = "arm"))]
        let single_quads = false;
        #[cfg(target_arch = "aarch64")]
        let wide = isa == Isa::Neon && !self.pairs_fit();
        #[cfg(not(target_arch = "aarch64"))]
        let wide = false;
        let weights16: Arc<[i16]> = if wide {
            let bytes = |w: &u32| w.to_le_bytes().map(|b| b as i8 as i16);
            let opad = self.out_channels + MR;
            let mut wide = vec![0i16; self.quads() * 4 * opad];
            for (quad, row) in self.weights.chunks_exact(opad).enumerate() {
                for (o, w) in row.iter().enumerate() {
                    for (j, b) in bytes(w).into_iter().enumerate() {
                        wide[(4 * quad + j) * opad + o] = b;
                    }
                }
            }
            wide.into()
        } else {
            Arc::new([])
        };
        Int8Conv { isa, weights16, single_quads, ..self.clone() }
    }

    /// [`Self::eval_input`] on values (the tests' entry).
    #[cfg(test)]
    fn eval_with<T: Out>(&self, x: &[f32], out: &mut [T]) -> TractResult<()> {
        self.eval_input(Input::Values(x), out)
    }

    fn eval_input<T: Out>(&self, x: Input, out: &mut [T]) -> TractResult<()> {
        if self.dynamic {
            let Input::Values(values) = x else {
                tract_core::internal::bail!("{OP_NAME}: a dynamically quantized input must be f32 values");
            };
            return self.on_grid_of(values).eval_input(x, out);
        }
        thread_local! {
            /// The packed input, the im2col bytes and the widened input, kept
            /// by each thread between inferences so that running one
            /// allocates nothing.
            static BUFFERS: std::cell::RefCell<(Vec<u32>, Vec<u8>, Vec<i16>)> =
                const { std::cell::RefCell::new((Vec::new(), Vec::new(), Vec::new())) };
        }
        // Taken out rather than borrowed across the threaded part: a thread
        // that runs another job while it waits finds them empty, not locked.
        let (mut packed_buf, mut bytes, mut wide) = BUFFERS.take();
        // Every word is written by the packing: no need to clear.
        let len = self.quads() * self.padded_pixels();
        if packed_buf.len() < len {
            packed_buf.resize(len, 0);
        }
        let packed = &mut packed_buf[..len];
        let result = self.pack_and_run(x, out, packed, &mut bytes, &mut wide);
        BUFFERS.set((packed_buf, bytes, wide));
        result
    }

    fn pack_and_run<T: Out>(
        &self,
        x: Input,
        out: &mut [T],
        packed: &mut [u32],
        bytes: &mut Vec<u8>,
        wide: &mut Vec<i16>,
    ) -> TractResult<()> {
        let packed = self.pack(x, packed, bytes, wide)?;
        let work = out.len() * self.depth();
        tract_linalg::multithread::par_chunks_mut(out, self.pixels, work, |first, chunk| {
            self.run_rows(packed, chunk, first);
            Ok(())
        })
    }

    /// Packs `x` as this operator's kernels read it, into `packed` (and
    /// `bytes` for an im2col's planes, `wide` for the SMLAL loops).
    fn pack<'a>(
        &self,
        x: Input,
        packed: &'a mut [u32],
        bytes: &mut Vec<u8>,
        wide: &'a mut Vec<i16>,
    ) -> TractResult<Packed<'a>> {
        let vnni = self.isa == Isa::Avx512Vnni;
        let avx2 = matches!(self.isa, Isa::Avx2 | Isa::AvxVnni);
        match (&self.im2col, x) {
            #[cfg(target_arch = "x86_64")]
            // SAFETY (all three): the op only has this ISA when the CPU has it (`with_isa`).
            (Some(g), Input::Values(x)) if vnni => unsafe {
                vnni::fill_planes(self, g, x, bytes);
                vnni::pack_im2col_avx512(self, g, bytes, packed)
            },
            #[cfg(target_arch = "x86_64")]
            (None, Input::Values(x)) if vnni => unsafe { vnni::pack(self, x, packed) },
            #[cfg(target_arch = "x86_64")]
            (None, Input::Indices(x)) if vnni => unsafe { vnni::pack_indices(self, x, packed) },
            #[cfg(target_arch = "x86_64")]
            // SAFETY (all three): as above.
            (Some(g), Input::Values(x)) if avx2 => unsafe { avx2::pack_im2col(self, g, x, bytes, packed) },
            #[cfg(target_arch = "x86_64")]
            (None, Input::Values(x)) if avx2 => unsafe { avx2::pack(self, x, packed) },
            #[cfg(target_arch = "x86_64")]
            (None, Input::Indices(x)) if avx2 => unsafe { avx2::pack_indices(self, x, packed) },
            #[cfg(target_arch = "aarch64")]
            (None, x) if matches!(self.isa, Isa::NeonDot | Isa::Neon) => {
                let rows = match x {
                    Input::Values(x) => neon::Rows::Values(x),
                    Input::Indices(x) => neon::Rows::Indices(x),
                };
                if self.isa == Isa::Neon && !self.weights16.is_empty() {
                    neon::pack_wide(self, rows, wide);
                    return Ok(Packed::Wide(wide));
                }
                neon::pack_signed(self, rows, packed);
                return Ok(Packed::Words(packed));
            }
            #[cfg(target_arch = "aarch64")]
            (Some(g), Input::Values(x))
                if self.isa == Isa::NeonDot || (self.isa == Isa::Neon && self.weights16.is_empty()) =>
            {
                neon::fill_planes(self, g, x, bytes);
                neon::pack_im2col_signed(self, g, bytes, packed);
                return Ok(Packed::Words(packed));
            }
            #[cfg(target_arch = "arm")]
            (None, x) if self.isa == Isa::Neon => {
                arm32::pack_signed(self, x, packed);
                return Ok(Packed::Words(packed));
            }
            #[cfg(target_arch = "arm")]
            (Some(g), Input::Values(x)) if self.isa == Isa::Neon => {
                arm32::fill_planes(self, g, x, bytes);
                arm32::pack_im2col_signed(self, g, bytes, packed);
                return Ok(Packed::Words(packed));
            }
            (Some(g), Input::Values(x)) => {
                self.fill_planes(g, x, bytes);
                self.pack_im2col(g, bytes, packed)
            }
            (None, Input::Values(x)) => self.pack_plain(x, packed),
            (None, Input::Indices(x)) => self.pack_plain_indices(x, packed),
            (Some(_), Input::Indices(_)) => tract_core::internal::bail!("{OP_NAME}: byte input to an im2col"),
        }
        let _ = (vnni, avx2, &wide);
        match self.isa {
            #[cfg(target_arch = "aarch64")]
            Isa::NeonDot => to_signed(packed),
            #[cfg(target_arch = "aarch64")]
            Isa::Neon if !self.weights16.is_empty() => {
                neon::widen(packed, wide);
                return Ok(Packed::Wide(wide));
            }
            #[cfg(any(target_arch = "aarch64", target_arch = "arm"))]
            Isa::Neon => to_signed(packed),
            _ => {}
        }
        Ok(Packed::Words(packed))
    }

    /// Output channels `first..first + out.len() / P` from `packed` ([`Self::pack`]),
    /// on this operator's kernels.
    fn run_rows<T: Out>(&self, packed: Packed, out: &mut [T], first: usize) {
        match (self.isa, packed) {
            #[cfg(target_arch = "x86_64")]
            // SAFETY: the op only has this ISA when the CPU has it (`with_isa`).
            (Isa::Avx512Vnni, Packed::Words(packed)) => unsafe { vnni::run(self, packed, out, first) },
            #[cfg(target_arch = "x86_64")]
            // SAFETY: as above; `with_isa` split the weights for this ISA.
            (Isa::Avx2, Packed::Words(packed)) => unsafe { avx2::run(self, packed, out, first) },
            #[cfg(target_arch = "x86_64")]
            // SAFETY: as above.
            (Isa::AvxVnni, Packed::Words(packed)) => unsafe { avx2::run_vnni(self, packed, out, first) },
            #[cfg(target_arch = "aarch64")]
            // SAFETY: the op only has this ISA when the CPU has the dot product (`with_isa`).
            (Isa::NeonDot, Packed::Words(packed)) => unsafe { neon::run_dot(self, packed, out, first) },
            #[cfg(target_arch = "aarch64")]
            // SAFETY: NEON is the aarch64 baseline; `wide` is this op's widened input.
            (Isa::Neon, Packed::Wide(wide)) => unsafe { neon::run_wide(self, wide, out, first) },
            #[cfg(target_arch = "aarch64")]
            // SAFETY: NEON is the aarch64 baseline; `with_isa` kept the
            // widened weights (and `pack` the widened input) for weights of -128.
            (Isa::Neon, Packed::Words(packed)) => unsafe { neon::run_pairs(self, packed, out, first) },
            #[cfg(target_arch = "arm")]
            // SAFETY: the op only has this ISA when the CPU has NEON and
            // VFPv4 (`with_isa`); `pack` made the input signed.
            (Isa::Neon, Packed::Words(packed)) => unsafe { arm32::run_pairs(self, packed, out, first) },
            (_, Packed::Words(packed)) => self.run_plain(packed, out, first),
            (isa, Packed::Wide(_)) => unreachable!("{OP_NAME}: widened input for the {isa} kernels"),
        }
    }
}

/// The packed input, as [`Int8Conv::pack`] leaves it for the kernels.
#[derive(Clone, Copy)]
enum Packed<'a> {
    /// Four bytes of a pixel's sum per word ([`Int8Conv::word_at`]); signed
    /// for [`Isa::NeonDot`].
    Words(&'a [u32]),
    /// One i16 per value, a row of `NR` pixels per input channel ([`Isa::Neon`]).
    #[cfg_attr(not(target_arch = "aarch64"), allow(dead_code))]
    Wide(&'a [i16]),
}

/// Pixels per block of the 128- and 256-bit kernels ([`neon`], [`avx2`]):
/// 8 sums per output channel.
#[cfg(any(target_arch = "aarch64", target_arch = "x86_64"))]
const PX: usize = 8;

// Their row stores are written out for 8 rows, and blocks of PX pixels tile NR.
#[cfg(any(target_arch = "aarch64", target_arch = "x86_64"))]
const _: () = assert!(MR == 8 && NR.is_multiple_of(PX));

/// One row's `PX` integer sums through the scale, bias and epilogue, the
/// arithmetic of [`Int8Conv::run_plain`], into `out[..n]`.
///
/// # Safety
/// `out` must be writable for `n <= PX` values.
#[cfg(target_arch = "x86_64")]
#[inline(always)]
unsafe fn finish_row<T: Out, const CLAMP: bool, const QDQ: bool>(
    sums: &[i32; PX],
    mul: f32,
    bias: f32,
    epi: Applied,
    out: *mut T,
    n: usize,
) {
    debug_assert!(n <= PX);
    let mut vals = [T::default(); PX];
    for (v, &s) in vals.iter_mut().zip(sums) {
        *v = T::make::<CLAMP, QDQ>(epi, (s as f32).mul_add(mul, bias));
    }
    std::ptr::copy_nonoverlapping(vals.as_ptr(), out, n);
}

/// Calls `$f::<T, CLAMP, QDQ>` with the epilogue's clip and pair as constants.
#[cfg(any(target_arch = "aarch64", target_arch = "x86_64", target_arch = "arm"))]
macro_rules! by_epilogue {
    ($f:ident, $op:ident, $($arg:expr),*) => {
        match ($op.epi.clamps(), $op.epi.qdq.is_some()) {
            (false, false) => $f::<T, false, false>($op, $($arg),*),
            (false, true) => $f::<T, false, true>($op, $($arg),*),
            (true, false) => $f::<T, true, false>($op, $($arg),*),
            (true, true) => $f::<T, true, true>($op, $($arg),*),
        }
    };
}

/// `$go!(clip, end)` with the block's clip (`true`/`false`) and how it
/// ends: `u8` indices (which always follow a pair), the pair's values
/// (`qdq`) or plain `f32` values; the ARM rungs' assembly blocks take these
/// as their epilogue's text.
#[cfg(any(target_arch = "aarch64", target_arch = "arm"))]
macro_rules! by_store {
    ($go:ident, $index:expr, $clamp:expr, $qdq:expr) => {
        match ($index, $clamp, $qdq) {
            (true, true, _) => $go!(true, u8),
            (true, false, _) => $go!(false, u8),
            (false, true, true) => $go!(true, qdq),
            (false, true, false) => $go!(true, f32),
            (false, false, true) => $go!(false, qdq),
            (false, false, false) => $go!(false, f32),
        }
    };
}

/// `store_row(acc[r], ...)` for rows `r < rows`, a literal row index per
/// use so that the sums stay in registers.
#[cfg(any(target_arch = "aarch64", target_arch = "x86_64"))]
macro_rules! store_rows {
    ($op:ident, $acc:ident, $rows:ident, $first:ident, $o:ident, $out:ident, $p:ident, $px:ident, $n:ident, $epi:expr, [$($r:literal)*]) => {
        $(
            if $r < $rows {
                let (mul, bias) = $op.scaling($first + $o + $r);
                store_row::<T, CLAMP, QDQ>($acc[$r], mul, bias, $epi, $out.add(($o + $r) * $p + $px), $n);
            }
        )*
    };
}

/// Flips each packed byte's top bit: index `n` becomes the signed byte
/// `n - 128`, as the ARM loops multiply signed bytes.
#[cfg(any(target_arch = "aarch64", target_arch = "arm"))]
fn to_signed(packed: &mut [u32]) {
    for w in packed {
        *w ^= 0x8080_8080;
    }
}

#[cfg(target_arch = "aarch64")]
#[path = "int8_neon.rs"]
pub(super) mod neon;

#[cfg(target_arch = "arm")]
#[path = "int8_arm32.rs"]
mod arm32;

#[cfg(target_arch = "arm")]
pub(super) use arm32::cpu_has_neon as arm32_cpu_has_neon;

#[cfg(target_arch = "x86_64")]
#[path = "int8_avx2.rs"]
mod avx2;

#[cfg(target_arch = "x86_64")]
mod vnni {
    //! The AVX-512 VNNI packing and block loops.

    use std::arch::x86_64::*;

    use super::super::epilogue::avx512::Regs;
    use super::{Im2col, Int8Conv, Out, MR, NR};

    /// [`Int8Conv::pack_im2col`] compiled for AVX-512.
    #[target_feature(enable = "avx512f,avx512bw")]
    pub(super) unsafe fn pack_im2col_avx512(op: &Int8Conv, g: &Im2col, bytes: &[u8], packed: &mut [u32]) {
        op.pack_im2col(g, bytes, packed)
    }

    /// [`Int8Conv::fill_planes`], 16 values per step, with the same values.
    #[target_feature(enable = "avx512f,avx512bw")]
    pub(super) unsafe fn fill_planes(op: &Int8Conv, g: &Im2col, x: &[f32], bytes: &mut Vec<u8>) {
        let ([h, w], [pt, pl]) = (g.in_hw, g.pad);
        let (hp, wp) = Int8Conv::planes_hw(g);
        let qd = op.input;
        bytes.clear();
        bytes.resize(op.in_channels * hp * wp, (-qd.lo) as u8);
        let (inv, lo, hi) = (_mm512_set1_ps(qd.inv_scale), _mm512_set1_ps(qd.lo), _mm512_set1_ps(qd.hi));
        let magic = _mm512_set1_ps(super::ROUND_MAGIC);
        for (plane, channel) in bytes.chunks_exact_mut(hp * wp).zip(x.chunks_exact(h * w)) {
            for (row, line) in plane[pt * wp..].chunks_exact_mut(wp).zip(channel.chunks_exact(w)) {
                let dst = row[pl..pl + w].as_mut_ptr();
                for at in (0..w).step_by(16) {
                    let m = mask(w - at);
                    let v = _mm512_maskz_loadu_ps(m, line.as_ptr().add(at));
                    let q = _mm512_min_ps(_mm512_max_ps(_mm512_mul_ps(v, inv), lo), hi);
                    let n = _mm512_sub_ps(_mm512_sub_ps(_mm512_add_ps(q, magic), magic), lo);
                    _mm512_mask_cvtepi32_storeu_epi8(dst.add(at) as *mut _, m, _mm512_cvttps_epi32(n));
                }
            }
        }
    }

    /// [`Int8Conv::pack_plain`], 16 pixels per step, with the same values.
    #[target_feature(enable = "avx512f,avx512bw,avx512vnni")]
    pub(super) unsafe fn pack(op: &Int8Conv, x: &[f32], packed: &mut [u32]) {
        let (k, p, pp) = (op.in_channels, op.pixels, op.padded_pixels());
        debug_assert_eq!(packed.len(), op.quads() * pp);
        let qd = op.input;
        let inv = _mm512_set1_ps(qd.inv_scale);
        let lo = _mm512_set1_ps(qd.lo);
        let hi = _mm512_set1_ps(qd.hi);
        let magic = _mm512_set1_ps(super::ROUND_MAGIC);
        let packed = packed.as_mut_ptr();
        for quad in 0..op.quads() {
            for px in (0..pp).step_by(16) {
                let valid = p.saturating_sub(px).min(16);
                let mask = mask(valid);
                let mut word = _mm512_setzero_si512();
                for j in 0..4 {
                    let ch = 4 * quad + j;
                    if ch >= k || valid == 0 {
                        break;
                    }
                    let v = _mm512_maskz_loadu_ps(mask, x.as_ptr().add(ch * p + px));
                    let q = _mm512_min_ps(_mm512_max_ps(_mm512_mul_ps(v, inv), lo), hi);
                    let n = _mm512_sub_ps(_mm512_sub_ps(_mm512_add_ps(q, magic), magic), lo);
                    let n = _mm512_maskz_cvttps_epi32(mask, n);
                    word = _mm512_or_si512(word, _mm512_sllv_epi32(n, _mm512_set1_epi32(8 * j as i32)));
                }
                // 16 divides NR: the 16 words are consecutive.
                _mm512_storeu_si512(packed.add(op.word_at(quad, px)) as *mut _, word);
            }
        }
    }

    /// [`Int8Conv::pack_plain_indices`], 16 pixels per step, with the same words.
    #[target_feature(enable = "avx512f,avx512bw,avx512vnni")]
    pub(super) unsafe fn pack_indices(op: &Int8Conv, x: &[u8], packed: &mut [u32]) {
        let (k, p, pp) = (op.in_channels, op.pixels, op.padded_pixels());
        debug_assert_eq!(packed.len(), op.quads() * pp);
        let packed = packed.as_mut_ptr();
        for quad in 0..op.quads() {
            for px in (0..pp).step_by(16) {
                let valid = p.saturating_sub(px).min(16);
                let mut word = _mm512_setzero_si512();
                for j in 0..4 {
                    let ch = 4 * quad + j;
                    if ch >= k || valid == 0 {
                        break;
                    }
                    let src = &x[ch * p + px..][..valid];
                    let bytes = if valid == 16 {
                        _mm_loadu_si128(src.as_ptr() as *const _)
                    } else {
                        let mut tail = [0u8; 16];
                        tail[..valid].copy_from_slice(src);
                        _mm_loadu_si128(tail.as_ptr() as *const _)
                    };
                    let n = _mm512_cvtepu8_epi32(bytes);
                    word = _mm512_or_si512(word, _mm512_sllv_epi32(n, _mm512_set1_epi32(8 * j as i32)));
                }
                // 16 divides NR: the 16 words are consecutive.
                _mm512_storeu_si512(packed.add(op.word_at(quad, px)) as *mut _, word);
            }
        }
    }

    /// [`Int8Conv::run_plain`] in blocks of `MR` channels by `NR` pixels.
    #[target_feature(enable = "avx512f,avx512bw,avx512vnni")]
    pub(super) unsafe fn run<T: Out>(op: &Int8Conv, packed: &[u32], out: &mut [T], first: usize) {
        // The clip and the pair as constants, so a block without them skips their instructions.
        match (op.epi.clamps(), op.epi.qdq.is_some()) {
            (false, false) => run_kind::<T, false, false>(op, packed, out, first),
            (false, true) => run_kind::<T, false, true>(op, packed, out, first),
            (true, false) => run_kind::<T, true, false>(op, packed, out, first),
            (true, true) => run_kind::<T, true, true>(op, packed, out, first),
        }
    }

    /// The blocks for the output's size: pixels in lanes, or channels in lanes for few pixels.
    #[target_feature(enable = "avx512f,avx512bw,avx512vnni")]
    unsafe fn run_kind<T: Out, const CLAMP: bool, const QDQ: bool>(
        op: &Int8Conv,
        packed: &[u32],
        out: &mut [T],
        first: usize,
    ) {
        if op.pixels < super::SMALL {
            run_small::<T, CLAMP, QDQ>(op, packed, out, first)
        } else {
            run_with::<T, CLAMP, QDQ>(op, packed, out, first)
        }
    }

    /// [`Int8Conv::run_plain`] for outputs of fewer than [`SMALL`] pixels:
    /// 16 output channels across a register's lanes (their weight words are
    /// consecutive), up to 4 such registers by up to 4 pixels at a time, each
    /// pixel's input word broadcast.
    #[target_feature(enable = "avx512f,avx512bw,avx512vnni")]
    unsafe fn run_small<T: Out, const CLAMP: bool, const QDQ: bool>(
        op: &Int8Conv,
        packed: &[u32],
        out: &mut [T],
        first: usize,
    ) {
        const CV: usize = 4;
        const PX: usize = 4;
        let (p, opad, quads) = (op.pixels, op.out_channels + MR, op.quads());
        let channels = out.len() / p;
        let regs = Regs::new(&op.epi);
        // Output channel `lane` of a register goes `lane * p` values further.
        let stride = _mm512_mullo_epi32(
            _mm512_set_epi32(15, 14, 13, 12, 11, 10, 9, 8, 7, 6, 5, 4, 3, 2, 1, 0),
            _mm512_set1_epi32(p as i32),
        );
        let out = out.as_mut_ptr();
        let mut o = 0;
        while o < channels {
            let masks: [__mmask16; CV] = std::array::from_fn(|v| mask(channels.saturating_sub(o + 16 * v)));
            for px0 in (0..p).step_by(PX) {
                let pxs = (p - px0).min(PX);
                let mut acc = [[_mm512_setzero_si512(); CV]; PX];
                for (v, &m) in masks.iter().enumerate() {
                    let corr = _mm512_maskz_loadu_epi32(m, op.corr.as_ptr().add(first + o + 16 * v) as *const _);
                    for acc in acc.iter_mut() {
                        acc[v] = corr;
                    }
                }
                for quad in 0..quads {
                    let ws = op.weights.as_ptr().add(quad * opad + first + o);
                    let w: [__m512i; CV] =
                        std::array::from_fn(|v| _mm512_maskz_loadu_epi32(masks[v], ws.add(16 * v) as *const _));
                    for (j, acc) in acc.iter_mut().enumerate().take(pxs) {
                        let x = _mm512_set1_epi32(packed[op.word_at(quad, px0 + j)] as i32);
                        for v in 0..CV {
                            acc[v] = _mm512_dpbusd_epi32(acc[v], x, w[v]);
                        }
                    }
                }
                for (v, &m) in masks.iter().enumerate() {
                    if m == 0 {
                        continue;
                    }
                    let c = first + o + 16 * v;
                    let mul = _mm512_maskz_loadu_ps(m, op.mul.as_ptr().add(c));
                    let bias = _mm512_maskz_loadu_ps(m, op.bias.as_ptr().add(c));
                    for (j, acc) in acc.iter().enumerate().take(pxs) {
                        let y = _mm512_fmadd_ps(_mm512_cvtepi32_ps(acc[v]), mul, bias);
                        let base = out.add((o + 16 * v) * p + px0 + j);
                        T::scatter::<CLAMP, QDQ>(regs, base, m, stride, y);
                    }
                }
            }
            o += 16 * CV;
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

    #[target_feature(enable = "avx512f,avx512bw,avx512vnni")]
    unsafe fn run_with<T: Out, const CLAMP: bool, const QDQ: bool>(
        op: &Int8Conv,
        packed: &[u32],
        out: &mut [T],
        first: usize,
    ) {
        let (p, opad, quads) = (op.pixels, op.out_channels + MR, op.quads());
        let channels = out.len() / p;
        let regs = Regs::new(&op.epi);
        let out = out.as_mut_ptr();
        for px in (0..p).step_by(NR) {
            let (m0, m1) = (mask(p - px), mask(p.saturating_sub(px + 16)));
            let mut o = 0;
            while o < channels {
                let rows = (channels - o).min(MR);
                // The sums start from the zero correction, so the epilogue need not add it.
                let mut acc = [[_mm512_setzero_si512(); 2]; MR];
                for (r, acc) in acc.iter_mut().enumerate().take(rows) {
                    let corr = _mm512_set1_epi32(op.corr[first + o + r]);
                    *acc = [corr, corr];
                }
                let mut xs = packed.as_ptr().add(op.word_at(0, px));
                let mut ws = op.weights.as_ptr().add(first + o);
                for _ in 0..quads {
                    let x0 = _mm512_loadu_si512(xs as *const _);
                    let x1 = _mm512_loadu_si512(xs.add(16) as *const _);
                    for (r, acc) in acc.iter_mut().enumerate() {
                        let w = _mm512_set1_epi32(*ws.add(r) as i32);
                        acc[0] = _mm512_dpbusd_epi32(acc[0], x0, w);
                        acc[1] = _mm512_dpbusd_epi32(acc[1], x1, w);
                    }
                    xs = xs.add(NR);
                    ws = ws.add(opad);
                }
                // One macro use per row, so every index is a constant and the
                // sums stay in registers.
                macro_rules! store {
                    ($r:literal) => {
                        if $r < rows {
                            let c = first + o + $r;
                            let (mul, bias) = (_mm512_set1_ps(op.mul[c]), _mm512_set1_ps(op.bias[c]));
                            for (half, m) in [(0, m0), (1, m1)] {
                                if m == 0 {
                                    continue;
                                }
                                let v = _mm512_fmadd_ps(_mm512_cvtepi32_ps(acc[$r][half]), mul, bias);
                                T::store::<CLAMP, QDQ>(regs, out.add((o + $r) * p + px + 16 * half), m, v);
                            }
                        }
                    };
                }
                store!(0);
                store!(1);
                store!(2);
                store!(3);
                store!(4);
                store!(5);
                store!(6);
                store!(7);
                o += MR;
            }
        }
    }
}

/// Whether this operator is put in graphs here ([`Isa::int8_in_graphs`]):
/// when the kernels in use beat tract's float ones, or a rung was named.
/// Elsewhere tract's stay.
pub fn cpu_supported() -> bool {
    Isa::int8_in_graphs()
}

impl Op for Int8Conv {
    fn name(&self) -> StaticName {
        OP_NAME.into()
    }

    fn info(&self) -> TractResult<Vec<String>> {
        let kernel = match &self.im2col {
            Some(g) => format!(
                "{}x{} stride {:?} dilation {:?} pad {:?}",
                g.kernel[0], g.kernel[1], g.strides, g.dilations, g.pad
            ),
            None => "1x1".to_string(),
        };
        let (clip, pair) = self.epi.describe();
        let grid = if self.dynamic {
            "input on a u8 grid picked per inference".to_string()
        } else {
            format!("input step {} range [{}, {}]", self.input.scale, self.input.lo, self.input.hi)
        };
        let first = format!(
            "{kernel}, {} -> {} channels, {} pixels, {grid}, {clip}",
            self.in_channels, self.out_channels, self.pixels
        );
        let input = self.input_u8.then(|| "input: indices (u8) on that grid".to_string());
        let isa = Some(format!("kernels: {}", self.isa.describe()));
        let output = self.out_u8.then(|| "output: the pair's indices (u8)".to_string());
        Ok([first].into_iter().chain(pair).chain(input).chain(output).chain(isa).collect())
    }

    fn as_typed(&self) -> Option<&dyn TypedOp> {
        Some(self)
    }
}

impl EvalOp for Int8Conv {
    fn eval(&self, _ctx: &EvalContext, inputs: TVec<TValue>) -> TractResult<TVec<TValue>> {
        let len = self.in_channels * self.in_pixels();
        let shape = &self.out_shape;
        match (self.input_u8, self.out_u8) {
            (false, false) => {
                eval_into::<f32, f32>(OP_NAME, &inputs, len, shape, |x, out| self.eval_input(Input::Values(x), out))
            }
            (false, true) => {
                eval_into::<f32, u8>(OP_NAME, &inputs, len, shape, |x, out| self.eval_input(Input::Values(x), out))
            }
            (true, false) => {
                eval_into::<u8, f32>(OP_NAME, &inputs, len, shape, |x, out| self.eval_input(Input::Indices(x), out))
            }
            (true, true) => {
                eval_into::<u8, u8>(OP_NAME, &inputs, len, shape, |x, out| self.eval_input(Input::Indices(x), out))
            }
        }
    }

    fn eval_out_of_plan(&self, inputs: TVec<TValue>) -> TractResult<Option<TVec<TValue>>> {
        Ok(Some(self.eval(&EvalContext::out_of_plan(), inputs)?))
    }
}

impl TypedOp for Int8Conv {
    fn as_op(&self) -> &dyn Op {
        self
    }

    fn as_op_mut(&mut self) -> &mut dyn Op {
        self
    }

    fn output_facts(&self, inputs: &[&TypedFact]) -> TractResult<TVec<TypedFact>> {
        let dt = |bytes: bool| if bytes { DatumType::U8 } else { DatumType::F32 };
        output_fact(inputs, dt(self.input_u8), dt(self.out_u8), &self.out_shape)
    }
}

/// The grid the values at `outlet` lie on: when a quantize/dequantize pair
/// made them, as its own op or at the end of one of ours, possibly through
/// axis changes (which move values, never change them: a classifier's
/// flatten, when tract's declutter has not folded it away). Only grids of
/// at most 256 integers, which pack into a byte, qualify.
fn grid_of(model: &TypedModel, outlet: OutletId) -> Option<QuantDequant> {
    let mut node = model.node(outlet.node);
    while node.op_is::<AxisOp>() && node.inputs.len() == 1 {
        node = model.node(node.inputs[0].node);
    }
    let grid = if let Some(qd) = QuantDequant::of(node) {
        qd
    } else if let Some(dw) = node.op_as::<Depthwise>() {
        dw.output_grid()?
    } else if let Some(pw) = node.op_as::<Int8Conv>() {
        pw.output_grid()?
    } else {
        return None;
    };
    byte_grid(grid).then_some(grid)
}

/// The input grid of a sum reading `outlet`: a fixed one ([`grid_of`]),
/// or, after a dynamic quantize/dequantize, [`DYNAMIC_PLACEHOLDER`] with
/// `true`, and the outlet to read instead: the values before that rounding,
/// which the operator rounds the same way itself (the rounding op is then
/// left without readers, unless others read it).
fn input_grid(model: &TypedModel, outlet: OutletId) -> Option<(QuantDequant, bool, OutletId)> {
    if let Some(grid) = grid_of(model, outlet) {
        return Some((grid, false, outlet));
    }
    let node = model.node(outlet.node);
    node.op_is::<DynQuantDequant>().then(|| (DYNAMIC_PLACEHOLDER, true, node.inputs[0]))
}

/// Whether `grid`'s indices fit in a byte.
fn byte_grid(grid: QuantDequant) -> bool {
    // ONNX's 8-bit grids span at most [-255, 255] steps from their zero point;
    // the bound also keeps the integer sums and corrections within i32.
    let whole = |v: f32| v.fract() == 0.0 && v.abs() <= 256.0;
    let fits = whole(grid.lo) && whole(grid.hi) && grid.lo <= grid.hi && grid.hi - grid.lo <= 255.0;
    let sane = grid.scale.is_finite() && grid.scale > 0.0 && grid.inv_scale.is_finite() && grid.inv_scale > 0.0;
    fits && sane
}

/// The largest magnitude of `values` (infinite or NaN when one is).
pub(super) fn largest(values: &[f32]) -> f32 {
    // On magnitudes' bit patterns, whose integer order is their order (and
    // puts infinities and NaNs above every finite value): an integer maximum,
    // which vectorises where a float one does not.
    let top = values.iter().fold(0u32, |m, w| m.max(w.to_bits() & 0x7fff_ffff));
    if top < f32::INFINITY.to_bits() {
        f32::from_bits(top)
    } else {
        f32::NAN
    }
}

/// The weights of one output channel as int8 steps of one scale, if they are
/// whole multiples of it (what dequantized symmetric int8 weights are): the
/// scale and the integers. Tries the channel's largest magnitude as 127 steps
/// (how quantizers scale symmetric per-channel weights), then as 128; then
/// the same with `tensor_top`, the whole tensor's largest magnitude (weights
/// quantized per tensor, where a channel's largest is fewer steps).
pub(super) fn integer_weights(row: &[f32], tensor_top: f32) -> Option<(f32, Vec<i8>)> {
    let top = largest(row);
    if !top.is_finite() {
        return None;
    }
    if top == 0.0 {
        return Some((0.0, vec![0; row.len()]));
    }
    let candidates = [top / 127.0, top / 128.0, tensor_top / 127.0, tensor_top / 128.0];
    candidates.into_iter().filter(|s| s.is_finite() && *s > 0.0).find_map(|scale| {
        // One pass without early exit, a call to `round` (baseline x86-64 has
        // no rounding instruction) or a float maximum, so that it vectorises:
        // models hold millions of weights, checked at every load. `|w * inv|`
        // is at most 128 here, where the `ROUND_MAGIC` rounding is exact.
        let inv = 1.0 / scale;
        let round = |w: f32| (w * inv + ROUND_MAGIC) - ROUND_MAGIC;
        // A count of the values off the grid or out of range: an integer sum.
        let bad: u32 = row
            .iter()
            .map(|&w| {
                let r = round(w);
                ((w * inv - r).abs() > 1e-3 || !(-128.0..=127.0).contains(&r)) as u32
            })
            .sum();
        (bad == 0).then(|| (scale, row.iter().map(|&w| round(w) as i8).collect()))
    })
}

/// Whether `es`, with the activation at input `xi` (rank 3, or 4 with a
/// leading batch axis of one) and constant `[O, K]` weights at `wi`, is a 1x1
/// convolution into `[O, H, W]` (or `[1, O, H, W]` when the batch axis is
/// kept): the axis letters differ between tract's ONNX import and its NNEF
/// reader, so the mapping is checked axis by axis.
pub(super) fn is_pointwise(es: &EinSum, xi: usize, wi: usize, x_rank: usize) -> bool {
    let (ins, out) = (InOut::In, InOut::Out(0));
    let axes = &es.axes;
    let out_rank = axes.rank(out);
    if axes.input_count() != 2
        || axes.rank(ins(wi)) != 2
        || !(3..=4).contains(&x_rank)
        || !(3..=x_rank).contains(&out_rank)
    {
        return false;
    }
    let (c, oc) = (x_rank - 3, out_rank - 3);
    // Where an axis of an input appears: in the activation, the weights, the output.
    let at = |io: InOut, pos: usize| {
        axes.axis((io, pos)).ok().map(|a| (a.inputs[xi].to_vec(), a.inputs[wi].to_vec(), a.outputs[0].to_vec()))
    };
    let none: Vec<usize> = vec![];
    let o_ok = at(ins(wi), 0) == Some((none.clone(), vec![0], vec![oc]));
    let k_ok = at(ins(wi), 1) == Some((vec![c], vec![1], none.clone()));
    let h_ok = at(ins(xi), c + 1) == Some((vec![c + 1], none.clone(), vec![oc + 1]));
    let w_ok = at(ins(xi), c + 2) == Some((vec![c + 2], none.clone(), vec![oc + 2]));
    // The batch axis of one is summed away, or kept in front.
    let n_out = if oc == 1 { vec![0] } else { none.clone() };
    let n_ok = c == 0 || at(ins(xi), 0) == Some((vec![0], none, n_out));
    o_ok && k_ok && h_ok && w_ok && n_ok
}

/// Whether `es`, with the activation at input `xi` (shape `x`) and constant
/// `[O, K]` weights at `wi` (output shape `y`), is a matrix-vector product:
/// `K` on one axis of the activation and `O` on one axis of the output, every
/// other axis of either of size one (a classifier after global pooling).
fn is_matvec(es: &EinSum, xi: usize, wi: usize, x: &[usize], y: &[usize]) -> bool {
    let axes = &es.axes;
    if axes.input_count() != 2 || axes.rank(InOut::In(wi)) != 2 {
        return false;
    }
    let (Ok(o), Ok(k)) = (axes.axis((InOut::In(wi), 0)), axes.axis((InOut::In(wi), 1))) else { return false };
    let o_ok = o.inputs[wi].as_slice() == [0] && o.inputs[xi].is_empty() && o.outputs[0].len() == 1;
    let k_ok = k.inputs[wi].as_slice() == [1] && k.inputs[xi].len() == 1 && k.outputs[0].is_empty();
    if !o_ok || !k_ok {
        return false;
    }
    let (ko, oo) = (k.inputs[xi][0], o.outputs[0][0]);
    x.iter().enumerate().all(|(i, &d)| i == ko || d == 1) && y.iter().enumerate().all(|(i, &d)| i == oo || d == 1)
}

/// Whether `es`, with the activation at input `xi` (shape `x`) and constant
/// rank-2 weights at `wi` (output shape `y`), is a product of each row of
/// the activation by the weights (a QDQ `MatMul` or `Gemm` of a sequence or
/// batch: `[.., M, K] x [K, O] -> [.., M, O]`): `K` the activation's last
/// axis, `O` the output's, the activation's other axes the output's others
/// in the same order (an axis of one may be summed away: a batch of one),
/// more than one row. Returns whether the weights are `[K, O]` (else `[O, K]`).
fn is_rowwise(es: &EinSum, xi: usize, wi: usize, x: &[usize], y: &[usize]) -> Option<bool> {
    let axes = &es.axes;
    let (rank, y_rank) = (x.len(), y.len());
    if axes.input_count() != 2 || axes.rank(InOut::In(wi)) != 2 || rank < 2 || y_rank < 2 {
        return None;
    }
    // The weights' axis summed with the activation's last one, and the other.
    let k = axes.axis((InOut::In(xi), rank - 1)).ok()?;
    let kw = match k.inputs[wi].as_slice() {
        &[a] if k.inputs[xi].len() == 1 && k.outputs[0].is_empty() => a,
        _ => return None,
    };
    let o = axes.axis((InOut::In(wi), 1 - kw)).ok()?;
    if !o.inputs[xi].is_empty() || o.outputs[0].as_slice() != [y_rank - 1] {
        return None;
    }
    // The activation's other axes, in order, are the output's others.
    let mut next = 0;
    for (i, &d) in x[..rank - 1].iter().enumerate() {
        let a = axes.axis((InOut::In(xi), i)).ok()?;
        match (a.inputs[wi].is_empty(), a.outputs[0].as_slice()) {
            (true, &[at]) if at == next && y[at] == d => next += 1,
            (true, &[]) if d == 1 => {}
            _ => return None,
        }
    }
    (next == y_rank - 1 && x[..rank - 1].iter().product::<usize>() > 1).then_some(kw == 0)
}

/// The operator for the `EinSum` at `node`, if it is a 1x1 convolution of
/// one channels-first image ([`is_pointwise`]) or a matrix-vector product
/// ([`is_matvec`]) with constant integer-step weights and an input on a
/// byte grid; with the outlet it reads ([`input_grid`]).
fn for_einsum(model: &TypedModel, node: usize) -> Option<(Int8Conv, OutletId)> {
    let node = model.node(node);
    let p = Product::of(model, node)?;
    let (k, pixels) = if is_pointwise(p.es, p.xi, p.wi, p.in_shape.len()) {
        match *p.in_shape {
            [k, h, w] | [1, k, h, w] => (k, h * w),
            _ => return None,
        }
    } else if is_matvec(p.es, p.xi, p.wi, &p.in_shape, &p.out_shape) {
        (p.in_shape.iter().product(), 1)
    } else {
        return None;
    };
    // At most 2^14 input channels: sums of products of a byte and an int8 stay within i32.
    if k > 16_384 {
        return None;
    }
    let (o, w) = p.weights(model, k, pixels)?;
    let (grid, dynamic, input) = input_grid(model, node.inputs[p.xi])?;
    let op = build(grid, k, o, pixels, None, &w, vec![0.0; o], p.out_shape)?;
    Some((Int8Conv { dynamic, ..op }, input))
}

/// The operator for the `EinSum` at `node`, if it is a row-wise product
/// ([`is_rowwise`]) with constant integer-step weights and an input on a
/// byte grid: the same product transposed, `[K, M] -> [O, M]` (a 1x1
/// convolution of `M` pixels, which every rung's kernels compute), with the
/// outlet it reads. [`swap_in_rowwise`] moves the axes around it.
fn for_rowwise(model: &TypedModel, node: usize) -> Option<(Int8Conv, OutletId)> {
    let node = model.node(node);
    let p = Product::of(model, node)?;
    let k_first = is_rowwise(p.es, p.xi, p.wi, &p.in_shape, &p.out_shape)?;
    let (rank, y_rank) = (p.in_shape.len(), p.out_shape.len());
    let (k, o) = (p.in_shape[rank - 1], p.out_shape[y_rank - 1]);
    let rows: usize = p.in_shape[..rank - 1].iter().product();
    // At most 2^14 input channels, as for the other forms.
    if k > 16_384 || k == 0 || o == 0 {
        return None;
    }
    let (w_shape, w) = const_f32(model, node.inputs[p.wi])?;
    let w = match (&*w_shape, k_first) {
        (&[kk, oo], true) if (kk, oo) == (k, o) => {
            (0..o).flat_map(|oc| (0..k).map(move |i| (oc, i))).map(|(oc, i)| w[i * o + oc]).collect()
        }
        (&[oo, kk], false) if (kk, oo) == (k, o) => w,
        _ => return None,
    };
    let (grid, dynamic, input) = input_grid(model, node.inputs[p.xi])?;
    let out_shape: TVec<usize> = std::iter::once(o).chain(p.out_shape[..y_rank - 1].iter().copied()).collect();
    let op = build(grid, k, o, rows, None, &w, vec![0.0; o], out_shape)?;
    Some((Int8Conv { dynamic, ..op }, input))
}

/// Puts `op` ([`for_rowwise`]) in place of the product at `id` and the
/// bias, clip and pair after it, reading `input` with its last axis moved
/// first (the rows' values become the pixels of each channel) and moving
/// the output's first axis last.
fn swap_in_rowwise(model: &mut TypedModel, id: usize, input: OutletId, mut op: Int8Conv) -> TractResult<()> {
    let folded = Folded::after_rows(model, id, op.pixels, op.out_channels);
    if let Some(bias) = folded.bias {
        op.bias = bias.into();
    }
    op.epi = folded.epi;
    let node = model.node(id);
    let (rank, y_rank) = (model.outlet_fact(input)?.rank(), op.out_shape.len());
    let mut patch = TypedModelPatch::new(format!("{OP_NAME} for {}", node.name));
    let tap = patch.tap_model(model, input)?;
    let cols = patch.wire_node(format!("{}.channels_first", node.name), AxisOp::Move(rank - 1, 0), &[tap])?[0];
    let sums = patch.wire_node(&node.name, op, &[cols])?[0];
    let rows = patch.wire_node(format!("{}.channels_last", node.name), AxisOp::Move(0, y_rank - 1), &[sums])?[0];
    patch.shunt_outside(model, folded.end, rows)?;
    patch.apply(model)
}

/// An f32 `EinSum` of one activation by constant weights, both shapes
/// concrete: what the 1x1 and matrix-vector matchers start from.
pub(super) struct Product<'a> {
    node: &'a TypedNode,
    pub es: &'a EinSum,
    /// The activation's input slot.
    pub xi: usize,
    /// The weights' input slot.
    pub wi: usize,
    pub in_shape: TVec<usize>,
    pub out_shape: TVec<usize>,
}

impl<'a> Product<'a> {
    /// The product at `node`, if it is one.
    pub fn of(model: &TypedModel, node: &'a TypedNode) -> Option<Product<'a>> {
        let es = node.op_as::<EinSum>()?;
        if es.q_params.is_some() || es.operating_dt != DatumType::F32 || node.inputs.len() != 2 {
            return None;
        }
        let konst = |i: usize| model.outlet_fact(node.inputs[i]).ok().is_some_and(|f| f.konst.is_some());
        let (xi, wi) = match (konst(0), konst(1)) {
            (false, true) => (0, 1),
            (true, false) => (1, 0),
            _ => return None,
        };
        let input = model.outlet_fact(node.inputs[xi]).ok()?;
        let output = &node.outputs[0].fact;
        if input.datum_type != DatumType::F32 || output.datum_type != DatumType::F32 {
            return None;
        }
        let in_shape = input.shape.as_concrete()?.into();
        let out_shape = output.shape.as_concrete()?.into();
        Some(Product { node, es, xi, wi, in_shape, out_shape })
    }

    /// The weights as `O` rows of `k`, for an output of `O` channels of
    /// `pixels` values: `O` and the values.
    pub fn weights(&self, model: &TypedModel, k: usize, pixels: usize) -> Option<(usize, Vec<f32>)> {
        let (w_shape, w) = const_f32(model, self.node.inputs[self.wi])?;
        match *w_shape {
            [o, kk]
                if kk == k
                    && k > 0
                    && o > 0
                    && pixels > 0
                    && self.out_shape.iter().product::<usize>() == o * pixels =>
            {
                Some((o, w))
            }
            _ => None,
        }
    }
}

/// The operator for the `Conv` at `node`, if it is a one-group f32
/// convolution (1-D or 2-D, explicit or no padding) of one channels-first
/// input on a byte grid, with constant integer-step weights and bias; with
/// the outlet it reads ([`input_grid`]).
fn for_conv(model: &TypedModel, node: usize) -> Option<(Int8Conv, OutletId)> {
    let node = model.node(node);
    let conv = node.op_as::<Conv>()?;
    let spec = &conv.pool_spec;
    let plain = conv.q_params.is_none() && conv.kernel_fmt == KernelFormat::OIHW && node.inputs.len() == 3;
    let rank = spec.kernel_shape.len();
    if !plain || conv.group != 1 || !(1..=2).contains(&rank) {
        return None;
    }
    // Everything as 2-D: a 1-D convolution is one of height 1.
    let two = |v: &[usize], fill: usize| if v.len() == 1 { [fill, v[0]] } else { [v[0], v[1]] };
    let kernel = two(&spec.kernel_shape, 1);
    let strides = spec.strides.as_deref().map_or([1, 1], |s| two(s, 1));
    let dilations = spec.dilations.as_deref().map_or([1, 1], |d| two(d, 1));
    let (before, after) = match &spec.padding {
        PaddingSpec::Valid => ([0, 0], [0, 0]),
        PaddingSpec::Explicit(b, a) | PaddingSpec::ExplicitOnnxPool(b, a, false)
            if b.len() == rank && a.len() == rank =>
        {
            (two(b, 0), two(a, 0))
        }
        _ => return None,
    };
    let input = model.outlet_fact(node.inputs[0]).ok()?;
    let in_shape = input.shape.as_concrete()?;
    let batch = match spec.data_format {
        DataFormat::NCHW => 1,
        DataFormat::CHW => 0,
        _ => return None,
    };
    if in_shape.len() != batch + 1 + rank || (batch == 1 && in_shape[0] != 1) {
        return None;
    }
    let c = in_shape[batch];
    let in_hw = two(&in_shape[batch + 1..], 1);
    let o = spec.output_channels;
    let out_shape: TVec<usize> = node.outputs[0].fact.shape.as_concrete()?.into();
    if out_shape.len() != in_shape.len() || out_shape[batch] != o || c != spec.input_channels {
        return None;
    }
    let out_hw = two(&out_shape[batch + 1..], 1);
    let fits = (0..2).all(|i| {
        let span = dilations[i] * (kernel[i] - 1) + 1;
        let padded = in_hw[i] + before[i] + after[i];
        strides[i] > 0 && kernel[i] > 0 && padded >= span && out_hw[i] == (padded - span) / strides[i] + 1
    });
    let depth = c * kernel[0] * kernel[1];
    // At most 2^14 values per sum: sums of products of a byte and an int8 stay within i32.
    if !fits || input.datum_type != DatumType::F32 || node.outputs[0].fact.datum_type != DatumType::F32 {
        return None;
    }
    if c == 0 || o == 0 || depth > 16_384 || out_hw[0] * out_hw[1] == 0 {
        return None;
    }
    let (w_shape, w) = const_f32(model, node.inputs[1])?;
    if w_shape.iter().product::<usize>() != o * depth || w_shape.first() != Some(&o) {
        return None;
    }
    let bias = match const_f32(model, node.inputs[2])? {
        (_, b) if b.len() == o => b,
        (_, b) if b.len() == 1 => vec![b[0]; o],
        _ => return None,
    };
    let (grid, dynamic, input) = input_grid(model, node.inputs[0])?;
    let g = Im2col { in_hw, kernel, strides, dilations, pad: before, out_hw, offsets: Arc::new([]) }.with_offsets(c);
    let op = build(grid, c, o, out_hw[0] * out_hw[1], Some(g), &w, bias, out_shape)?;
    Some((Int8Conv { dynamic, ..op }, input))
}

/// The operator for `o` output channels of `pixels` values from `c` input
/// channels on `grid`: the weights (`o` rows of the depth) as int8 steps and
/// their corrections, if every row is whole steps.
#[allow(clippy::too_many_arguments)]
fn build(
    grid: QuantDequant,
    c: usize,
    o: usize,
    pixels: usize,
    im2col: Option<Im2col>,
    w: &[f32],
    bias: Vec<f32>,
    out_shape: TVec<usize>,
) -> Option<Int8Conv> {
    let depth = c * im2col.as_ref().map_or(1, |g| g.kernel[0] * g.kernel[1]);
    let quads = depth.div_ceil(4);
    let opad = o + MR;
    let mut weights = vec![0u32; quads * opad];
    let mut corr = Vec::with_capacity(o);
    let mut wsum = Vec::with_capacity(o);
    let mut mul = Vec::with_capacity(o);
    let tensor_top = largest(w);
    for (oc, row) in w.chunks_exact(depth).enumerate() {
        let (scale, ints) = integer_weights(row, tensor_top)?;
        for (quad, four) in ints.chunks(4).enumerate() {
            let bytes: [u8; 4] = std::array::from_fn(|j| four.get(j).map_or(0, |&q| q as u8));
            weights[quad * opad + oc] = u32::from_le_bytes(bytes);
        }
        let sum = ints.iter().map(|&q| q as i32).sum::<i32>();
        corr.push(grid.lo as i32 * sum);
        wsum.push(sum);
        mul.push(grid.scale * scale);
    }
    let op = Int8Conv {
        in_channels: c,
        out_channels: o,
        pixels,
        im2col,
        input: grid,
        weights: weights.into(),
        corr: corr.into(),
        wsum: wsum.into(),
        mul: mul.into(),
        bias: bias.into(),
        epi: Epilogue::NONE,
        isa: Isa::Scalar,
        weights16: Arc::new([]),
        single_quads: false,
        input_u8: false,
        out_u8: false,
        dynamic: false,
        out_shape,
    };
    Some(op.with_isa(Isa::current()))
}

/// Folds what follows the sum at node `sum` into `op` ([`Folded::after`]);
/// returns the last outlet folded in.
fn fold_epilogue(model: &TypedModel, sum: usize, op: &mut Int8Conv, biased: bool) -> OutletId {
    let folded = Folded::after(model, sum, op.pixels, op.out_channels, biased);
    if let Some(bias) = folded.bias {
        op.bias = bias.into();
    }
    op.epi = folded.epi;
    folded.end
}

/// Replaces each int8-representable convolution of a decluttered QDQ graph
/// (tract's `EinSum` for a 1x1 one, `Conv` for the others), with the bias,
/// clip and quantize/dequantize pair after it, by [`Int8Conv`]; runs after
/// the depthwise pass (whose outputs feed them) and before tract's code
/// generation. Returns how many convolutions were replaced.
pub fn use_for_int8_convs(model: &mut TypedModel) -> TractResult<usize> {
    if !cpu_supported() {
        return Ok(0);
    }
    let replaced = replace(model)?;
    narrow_edges(model)?;
    Ok(replaced)
}

/// Makes each of our int8 operators whose output only one of our depthwise
/// operators reads store the indices on its output grid (`u8`) instead of
/// their f32 values, and that operator read them: a quarter of the memory
/// traffic between them (MobileNet's expanded activations, the largest);
/// and the same from a depthwise operator to the 1x1 int8 operator after
/// it. The readers get the same values. Returns how many edges.
fn narrow_edges(model: &mut TypedModel) -> TractResult<usize> {
    let outputs = model.output_outlets()?.to_vec();
    let mut narrowed = 0;
    for id in 0..model.nodes().len() {
        let node = model.node(id);
        let Some(conv) = node.op_as::<Int8Conv>() else { continue };
        let succs = &node.outputs[0].successors;
        let grid = conv.epi.qdq.filter(|&g| byte_grid(g));
        if conv.out_u8 || outputs.contains(&OutletId::new(id, 0)) || succs.len() != 1 || succs[0].slot != 0 {
            continue;
        }
        let (Some(grid), Some(dw)) = (grid, model.node(succs[0].node).op_as::<Depthwise>()) else { continue };
        let Some(dw) = dw.reading_indices(grid) else { continue };
        let next = succs[0].node;
        let conv = Int8Conv { out_u8: true, ..conv.clone() };
        let fact = DatumType::U8.fact(&*conv.out_shape);
        let node = model.node_mut(id);
        node.op = Box::new(conv);
        node.outputs[0].fact = fact;
        model.node_mut(next).op = Box::new(dw);
        narrowed += 1;
    }
    // And the other way: a depthwise operator's pair into a 1x1 int8 one.
    for id in 0..model.nodes().len() {
        let node = model.node(id);
        let Some(dw) = node.op_as::<Depthwise>() else { continue };
        let succs = &node.outputs[0].successors;
        let grid = dw.output_grid().filter(|&g| byte_grid(g));
        if outputs.contains(&OutletId::new(id, 0)) || succs.len() != 1 || succs[0].slot != 0 {
            continue;
        }
        let next = succs[0].node;
        let (Some(grid), Some(conv)) = (grid, model.node(next).op_as::<Int8Conv>()) else { continue };
        // The indices are counted from the low end of the grid the 1x1 one reads.
        if conv.input_u8 || conv.dynamic || conv.im2col.is_some() || conv.input != grid {
            continue;
        }
        let Some(dw) = dw.writing_indices() else { continue };
        let conv = Int8Conv { input_u8: true, ..conv.clone() };
        let node = model.node_mut(id);
        let fact = DatumType::U8.fact(node.outputs[0].fact.shape.clone());
        node.op = Box::new(dw);
        node.outputs[0].fact = fact;
        model.node_mut(next).op = Box::new(conv);
        narrowed += 1;
    }
    Ok(narrowed)
}

fn replace(model: &mut TypedModel) -> TractResult<usize> {
    let ids: Vec<usize> =
        model.nodes().iter().filter(|n| n.op_is::<EinSum>() || n.op_is::<Conv>()).map(|n| n.id).collect();
    let (mut replaced, mut rowwise) = (0, 0);
    for id in ids {
        if let Some((op, input)) = for_rowwise(model, id) {
            swap_in_rowwise(model, id, input, op)?;
            replaced += 1;
            rowwise += 1;
            continue;
        }
        let found = match for_conv(model, id) {
            Some((op, input)) => Some((op, input, true)),
            None => for_einsum(model, id).map(|(op, input)| (op, input, false)),
        };
        let Some((mut op, input, biased)) = found else { continue };
        let end = fold_epilogue(model, id, &mut op, biased);
        swap_in_from(model, id, input, op, end)?;
        replaced += 1;
    }
    if replaced > 0 {
        model.compact()?;
    }
    if rowwise > 0 {
        // Between two row-wise products the first's moved output goes
        // through tract's bias add and pair into the second's move back:
        // tract's axis pass carries the move through them, and the two cancel.
        let change_axes = Box::<tract_core::optim::change_axes::ChangeAxes>::default();
        tract_core::optim::Optimizer { passes: vec![change_axes], steps: None }.optimize(model)?;
    }
    Ok(replaced)
}

#[cfg(test)]
mod tests {
    use super::*;
    use tract_core::internal::{
        tensor0, tvec, AxesMapping, DatumTypeExt, IntoRunnable, SpecialOps, Tensor, TypedModelPatch,
    };
    use tract_core::ops::binary::TypedBinOp;
    use tract_core::ops::element_wise::ElementWiseOp;
    use tract_core::ops::math::{Add, Max, Min};
    use tract_core::prelude::IntoTValue;

    /// A deterministic spread of integers in `lo..=hi`.
    fn ints(n: usize, seed: u32, lo: i32, hi: i32) -> Vec<i32> {
        let mut s = seed.wrapping_mul(2_654_435_761).wrapping_add(1);
        (0..n)
            .map(|_| {
                s ^= s << 13;
                s ^= s >> 17;
                s ^= s << 5;
                lo + (s % (hi - lo + 1) as u32) as i32
            })
            .collect()
    }

    /// One test graph's shape and what follows the sum.
    struct Case {
        k: usize,
        o: usize,
        hw: [usize; 2],
        batch_axis: bool,
        /// The input grid's range in steps.
        grid: (f32, f32),
        bias: bool,
        clip: Option<(f32, f32)>,
        qdq: bool,
        /// Weights quantized per tensor (one step) instead of per channel.
        per_tensor: bool,
    }

    const IN_STEP: f32 = 0.05;
    const OUT_STEP: f32 = 0.1;

    /// The graph tract's declutter makes of a QDQ 1x1 convolution: a pair, the
    /// sum, then the bias, a clip and a pair as `case` says; and an input.
    fn graph(case: &Case) -> (TypedModel, Tensor) {
        let Case { k, o, hw: [h, w], batch_axis, grid, .. } = *case;
        let mut shape: TVec<usize> = tvec![k, h, w];
        if batch_axis {
            shape.insert(0, 1);
        }
        let mut model = TypedModel::default();
        let mut wire = model.add_source("x", DatumType::F32.fact(&*shape)).unwrap();
        let pair = ElementWiseOp(Box::new(QuantDequant::new(IN_STEP, grid.0, grid.1)), None);
        wire = model.wire_node("in_pair", pair, &[wire]).unwrap()[0];
        // Symmetric int8 weights, each channel with its own step and a largest
        // magnitude of 127; or one step for all, each channel with its own range.
        let q = ints(o * k, 5, -127, 127);
        let mut weights = Vec::with_capacity(o * k);
        for (oc, row) in q.chunks(k).enumerate() {
            if case.per_tensor {
                let range = 127 - 20 * (oc as i32 % 5);
                weights.extend(row.iter().map(|&v| (v * range / 127) as f32 * 0.003));
                continue;
            }
            let step = 0.002 * (1 + oc % 5) as f32;
            let top = row.iter().map(|v| v.abs()).max().unwrap();
            weights.extend(row.iter().map(|&v| if top == 0 { 0.0 } else { (v * 127 / top) as f32 * step }));
        }
        let weights = model.add_const("w", Tensor::from_shape(&[o, k], &weights).unwrap()).unwrap();
        let expr = if batch_axis { "NIHW,OI->OHW" } else { "IHW,OI->OHW" };
        let sum = EinSum { axes: expr.parse::<AxesMapping>().unwrap(), operating_dt: DatumType::F32, q_params: None };
        wire = model.wire_node("sum", sum, &[wire, weights]).unwrap()[0];
        if case.bias {
            let b: Vec<f32> = ints(o, 9, -50, 50).iter().map(|&v| v as f32 * 0.013).collect();
            let b = model.add_const("b", Tensor::from_shape(&[o, 1, 1], &b).unwrap()).unwrap();
            wire = model.wire_node("bias", TypedBinOp(Box::new(Add), None), &[wire, b]).unwrap()[0];
        }
        if let Some((lo, hi)) = case.clip {
            let lo = model.add_const("lo", tensor0(lo).broadcast_into_rank(3).unwrap()).unwrap();
            let hi = model.add_const("hi", tensor0(hi).broadcast_into_rank(3).unwrap()).unwrap();
            wire = model.wire_node("max", TypedBinOp(Box::new(Max), None), &[wire, lo]).unwrap()[0];
            wire = model.wire_node("min", TypedBinOp(Box::new(Min), None), &[hi, wire]).unwrap()[0];
        }
        if case.qdq {
            let pair = ElementWiseOp(Box::new(QuantDequant::new(OUT_STEP, -128.0, 127.0)), None);
            wire = model.wire_node("out_pair", pair, &[wire]).unwrap()[0];
        }
        model.select_output_outlets(&[wire]).unwrap();
        // Values past the grid's ends too: the input pair clips them.
        let n: usize = shape.iter().product();
        let x: Vec<f32> =
            ints(n, 3, grid.0 as i32 - 20, grid.1 as i32 + 20).iter().map(|&v| v as f32 * IN_STEP).collect();
        (model, Tensor::from_shape(&shape, &x).unwrap())
    }

    fn values(t: &TValue) -> Vec<f32> {
        t.try_as_plain_ram().unwrap().as_slice::<f32>().unwrap().to_vec()
    }

    /// Runs `model` through tract's code generation, after our pass when `ours`.
    fn run(mut model: TypedModel, input: &Tensor, ours: bool) -> (Vec<f32>, Vec<String>) {
        super::super::declutter(&mut model).unwrap();
        if ours {
            assert_eq!(replace(&mut model).unwrap(), 1, "the sum is replaced");
        }
        model.optimize().unwrap();
        let ops = model.nodes().iter().map(|n| n.op.name().to_string()).collect();
        let out = model.into_runnable().unwrap().run(tvec!(input.clone().into_tvalue())).unwrap();
        (values(&out[0]), ops)
    }

    fn case(k: usize, o: usize, hw: [usize; 2], batch_axis: bool) -> Case {
        Case { k, o, hw, batch_axis, grid: (-128.0, 127.0), bias: true, clip: None, qdq: true, per_tensor: false }
    }

    fn cases() -> Vec<Case> {
        vec![
            // Whole blocks: 4-channel quads, 8 output channels, 32 pixels.
            case(16, 8, [4, 8], false),
            // Ragged everywhere: 3 and 13 input channels, 5 and 17 outputs, 49 and 20 pixels.
            case(3, 5, [7, 7], true),
            case(13, 17, [4, 5], false),
            case(24, 144, [14, 14], false),
            Case { per_tensor: true, ..case(32, 12, [6, 6], false) },
            Case { grid: (0.0, 255.0), clip: Some((0.0, 6.0)), ..case(96, 24, [5, 11], true) },
            Case { grid: (-131.0, 124.0), bias: false, qdq: false, ..case(40, 9, [3, 20], false) },
            Case { clip: Some((-1.0, 0.5)), qdq: false, ..case(7, 12, [2, 17], false) },
            // Fewer than 16 pixels, on the other kernel: 4 pixels (one block of
            // 4), 6 (a ragged second block), 1; 21, 70 and 5 output channels.
            case(8, 21, [2, 2], false),
            case(30, 70, [2, 3], true),
            Case { clip: Some((-1.0, 0.5)), ..case(13, 5, [1, 1], false) },
            // Without the output's rounding, so that any error in a sum shows.
            Case { qdq: false, ..case(30, 40, [3, 3], false) },
        ]
    }

    /// The operator our pass builds from a graph's only convolution.
    fn operator_of(mut model: TypedModel) -> Int8Conv {
        super::super::declutter(&mut model).unwrap();
        let id = model.nodes().iter().find(|n| n.op_is::<EinSum>() || n.op_is::<Conv>()).expect("a convolution").id;
        let (mut op, biased) = match for_conv(&model, id) {
            Some((op, _)) => (op, true),
            None => (for_einsum(&model, id).expect("the convolution qualifies").0, false),
        };
        fold_epilogue(&model, id, &mut op, biased);
        op
    }

    /// The operator built from a case's graph, and that graph's input.
    fn operator(case: &Case) -> (Int8Conv, Tensor) {
        let (model, input) = graph(case);
        (operator_of(model), input)
    }

    /// One `Conv` graph's geometry (1-D when `in_hw` has one value).
    struct ConvCase {
        c: usize,
        o: usize,
        in_hw: Vec<usize>,
        kernel: Vec<usize>,
        strides: Vec<usize>,
        dilations: Vec<usize>,
        before: Vec<usize>,
        after: Vec<usize>,
        batch_axis: bool,
    }

    fn conv_cases() -> Vec<ConvCase> {
        let cc = |c,
                  o,
                  in_hw: &[usize],
                  kernel: &[usize],
                  strides: &[usize],
                  dilations: &[usize],
                  pad: (&[usize], &[usize])| {
            ConvCase {
                c,
                o,
                in_hw: in_hw.to_vec(),
                kernel: kernel.to_vec(),
                strides: strides.to_vec(),
                dilations: dilations.to_vec(),
                before: pad.0.to_vec(),
                after: pad.1.to_vec(),
                batch_axis: true,
            }
        };
        vec![
            cc(3, 16, &[9, 11], &[3, 3], &[1, 1], &[1, 1], (&[1, 1], &[1, 1])),
            // MobileNet's stem: stride 2, three input channels (a depth of 27, not whole quads).
            cc(3, 32, &[15, 15], &[3, 3], &[2, 2], &[1, 1], (&[1, 1], &[1, 1])),
            // Stride 2 with rows of 20 outputs: the packings' 16-pixel vector steps.
            cc(3, 8, &[6, 40], &[3, 3], &[2, 2], &[1, 1], (&[1, 1], &[1, 1])),
            // The vibration model's Gabor bank: 1-D, 41 taps, padded by 20.
            cc(3, 10, &[50], &[41], &[1], &[1], (&[20], &[20])),
            ConvCase { batch_axis: false, ..cc(5, 9, &[12, 10], &[3, 3], &[1, 1], &[2, 2], (&[0, 0], &[0, 0])) },
            cc(4, 7, &[7, 9], &[3, 2], &[2, 1], &[1, 1], (&[0, 1], &[1, 0])),
            // A 1x1 convolution of stride 2 stays a `Conv` in tract's graph.
            cc(6, 8, &[9, 9], &[1, 1], &[2, 2], &[1, 1], (&[0, 0], &[0, 0])),
            cc(40, 20, &[6, 6], &[3, 3], &[1, 1], &[1, 1], (&[1, 1], &[1, 1])),
            // digits' last convolution: a 2x2 output, on the kernel for few pixels.
            cc(16, 40, &[4, 4], &[3, 3], &[1, 1], &[1, 1], (&[0, 0], &[0, 0])),
        ]
    }

    /// A QDQ `Conv` as tract's declutter leaves it: a pair, the convolution
    /// with its bias, a pair; and an input.
    fn conv_graph(cc: &ConvCase) -> (TypedModel, Tensor) {
        let mut shape: TVec<usize> = tvec![cc.c];
        shape.extend(cc.in_hw.iter().copied());
        if cc.batch_axis {
            shape.insert(0, 1);
        }
        let mut model = TypedModel::default();
        let mut wire = model.add_source("x", DatumType::F32.fact(&*shape)).unwrap();
        // A grid whose zero is not its low end, so the padding's index (100) matters.
        let pair = ElementWiseOp(Box::new(QuantDequant::new(IN_STEP, -100.0, 155.0)), None);
        wire = model.wire_node("in_pair", pair, &[wire]).unwrap()[0];
        let depth = cc.c * cc.kernel.iter().product::<usize>();
        let q = ints(cc.o * depth, 13, -127, 127);
        let mut weights = Vec::with_capacity(q.len());
        for (oc, row) in q.chunks(depth).enumerate() {
            let step = 0.001 * (1 + oc % 3) as f32;
            let top = row.iter().map(|v| v.abs()).max().unwrap();
            weights.extend(row.iter().map(|&v| if top == 0 { 0.0 } else { (v * 127 / top) as f32 * step }));
        }
        let mut w_shape = vec![cc.o, cc.c];
        w_shape.extend(cc.kernel.iter().copied());
        let w = model.add_const("w", Tensor::from_shape(&w_shape, &weights).unwrap()).unwrap();
        let b: Vec<f32> = ints(cc.o, 17, -50, 50).iter().map(|&v| v as f32 * 0.01).collect();
        let b = model.add_const("b", Tensor::from_shape(&[cc.o], &b).unwrap()).unwrap();
        let fmt = if cc.batch_axis { DataFormat::NCHW } else { DataFormat::CHW };
        let padding = PaddingSpec::Explicit(cc.before.iter().copied().collect(), cc.after.iter().copied().collect());
        let spec = tract_core::ops::cnn::PoolSpec::new(
            fmt,
            cc.kernel.iter().copied().collect(),
            padding,
            Some(cc.dilations.iter().copied().collect()),
            Some(cc.strides.iter().copied().collect()),
            cc.c,
            cc.o,
        );
        wire = model.wire_node("conv", Conv::new(spec, KernelFormat::OIHW, 1, None), &[wire, w, b]).unwrap()[0];
        let pair = ElementWiseOp(Box::new(QuantDequant::new(OUT_STEP, -128.0, 127.0)), None);
        wire = model.wire_node("out_pair", pair, &[wire]).unwrap()[0];
        model.select_output_outlets(&[wire]).unwrap();
        let n: usize = shape.iter().product();
        let x: Vec<f32> = ints(n, 3, -120, 175).iter().map(|&v| v as f32 * IN_STEP).collect();
        (model, Tensor::from_shape(&shape, &x).unwrap())
    }

    /// Our operator's values against tract's float graph: equal to rounding,
    /// or one output step away for at most 2% of them.
    fn assert_close(got: &[f32], want: &[f32], tolerance: f32, label: &str) {
        assert_eq!(got.len(), want.len(), "{label}");
        let off = got.iter().zip(want).filter(|(g, w)| (*g - *w).abs() > 1e-4).count();
        for (i, (g, w)) in got.iter().zip(want).enumerate() {
            assert!((g - w).abs() <= tolerance, "{label}: value {i}: {g} against tract's {w}");
        }
        assert!(off * 50 <= got.len(), "{label}: {off} of {} values differ", got.len());
    }

    #[test]
    fn convolutions_match_tracts_float_sums_within_one_step() {
        for cc in conv_cases() {
            let (model, input) = conv_graph(&cc);
            let label =
                format!("c {} o {} in {:?} kernel {:?} strides {:?}", cc.c, cc.o, cc.in_hw, cc.kernel, cc.strides);
            assert_replaced_and_close(model, &input, OUT_STEP * 1.001, &label);
        }
    }

    #[test]
    fn matches_tracts_float_sums_within_one_step() {
        for case in cases() {
            let (model, input) = graph(&case);
            // Exact integer sums against float ones: values agree to rounding,
            // or, after the output's pair, land one step away, rarely.
            let tolerance = if case.qdq { OUT_STEP * 1.001 } else { 1e-4 };
            assert_replaced_and_close(model, &input, tolerance, &format!("k {} o {} hw {:?}", case.k, case.o, case.hw));
        }
    }

    /// Runs `model` with and without our pass: everything after the input's
    /// pair is our one operator (tract's downsampling for a strided 1x1
    /// aside), and its values are [`assert_close`] to tract's.
    fn assert_replaced_and_close(model: TypedModel, input: &Tensor, tolerance: f32, label: &str) {
        let (want, _) = run(model.clone(), input, false);
        let (got, ops) = run(model, input, true);
        let left = ops.iter().filter(|o| !matches!(o.as_str(), "Source" | "Const" | "Downsample")).cloned();
        assert_eq!(left.collect::<Vec<_>>(), ["EdgeinferQuantDequant", OP_NAME], "{label}: {ops:?}");
        assert_close(&got, &want, tolerance, label);
    }

    /// Says which of this architecture's kernels the CPU lacks, so that a
    /// test that could not run them says so in its output.
    fn say_skipped(test: &str) {
        let missing = Isa::missing();
        if !missing.is_empty() {
            let names: Vec<&str> = missing.iter().map(|i| i.describe()).collect();
            println!("{test}: skipped the {} kernels: this CPU lacks them", names.join(", "));
        }
    }

    #[test]
    fn every_isas_loops_give_the_scalar_values_bit_for_bit() {
        for case in cases() {
            let (op, input) = operator(&case);
            assert_isas_give_scalar_values(&op, &input, &format!("k {} o {} hw {:?}", case.k, case.o, case.hw));
        }
        for cc in conv_cases() {
            let (model, input) = conv_graph(&cc);
            let op = operator_of(model);
            // The 1x1 convolution of stride 2 is a downsampling then a pointwise sum in tract's graph.
            assert_eq!(op.im2col.is_some(), cc.kernel.iter().product::<usize>() > 1);
            assert_isas_give_scalar_values(&op, &input, &format!("in {:?} kernel {:?}", cc.in_hw, cc.kernel));
        }
        say_skipped("every_isas_loops_give_the_scalar_values_bit_for_bit");
    }

    /// `model` with its input pair (`in_pair`) made a dynamic one, as a
    /// dynamically quantized model's rewrite leaves it.
    fn made_dynamic(mut model: TypedModel) -> TypedModel {
        let id = model.nodes().iter().find(|n| n.name == "in_pair").expect("an input pair").id;
        model.node_mut(id).op = Box::new(DynQuantDequant);
        model
    }

    #[test]
    fn dynamically_quantized_inputs_match_tracts_float_sums_on_every_isa() {
        let graphs = cases()
            .into_iter()
            .map(|case| {
                let (model, input) = graph(&case);
                let tolerance = if case.qdq { OUT_STEP * 1.001 } else { 1e-4 };
                (model, input, tolerance, format!("k {} o {} hw {:?}", case.k, case.o, case.hw))
            })
            .chain(conv_cases().into_iter().map(|cc| {
                let (model, input) = conv_graph(&cc);
                (model, input, OUT_STEP * 1.001, format!("in {:?} kernel {:?}", cc.in_hw, cc.kernel))
            }));
        for (model, input, tolerance, label) in graphs {
            let model = made_dynamic(model);
            let label = format!("dynamic, {label}");
            let (want, _) = run(model.clone(), &input, false);
            let (got, ops) = run(model.clone(), &input, true);
            // The operator reads the values before the rounding and rounds them
            // itself: the rounding op is left without readers, and gone.
            let left = ops.iter().filter(|o| !matches!(o.as_str(), "Source" | "Const" | "Downsample"));
            assert_eq!(left.cloned().collect::<Vec<_>>(), [OP_NAME], "{label}: {ops:?}");
            assert_close(&got, &want, tolerance, &label);
            let op = operator_of(model);
            assert!(op.dynamic, "{label}");
            assert_isas_give_scalar_values(&op, &input, &label);
        }
        say_skipped("dynamically_quantized_inputs_match_tracts_float_sums_on_every_isa");
    }

    /// `op` with its first output channel's first weight set to -128 (which
    /// some kernels must treat apart: two of its products overflow 16 bits),
    /// the corrections made again.
    fn with_a_weight_of_minus_128(op: &Int8Conv) -> Int8Conv {
        let mut weights = op.weights.to_vec();
        weights[0] = (weights[0] & !0xff) | 0x80;
        let opad = op.out_channels + MR;
        let wsum: Vec<i32> = (0..op.out_channels)
            .map(|o| {
                let quad_sum =
                    |q: usize| weights[q * opad + o].to_le_bytes().iter().map(|&b| b as i8 as i32).sum::<i32>();
                (0..op.quads()).map(quad_sum).sum()
            })
            .collect();
        let corr: Vec<i32> = wsum.iter().map(|s| op.input.lo as i32 * s).collect();
        Int8Conv { weights: weights.into(), wsum: wsum.into(), corr: corr.into(), ..op.clone() }
    }

    /// `op` on `input` through each ISA's loops this CPU has and through the
    /// scalar ones: the same bits, values and indices; also with a weight of -128.
    fn assert_isas_give_scalar_values(op: &Int8Conv, input: &Tensor, label: &str) {
        assert_isas_give_scalar_values_of(op, input, label);
        assert_isas_give_scalar_values_of(&with_a_weight_of_minus_128(op), input, &format!("{label}, weight -128"));
    }

    fn assert_isas_give_scalar_values_of(op: &Int8Conv, input: &Tensor, label: &str) {
        let x = input.try_as_plain_ram().unwrap().as_slice::<f32>().unwrap().to_vec();
        let n = op.out_channels * op.pixels;
        let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
        let mut want = vec![0f32; n];
        op.with_isa(Isa::Scalar).eval_with(&x, &mut want).unwrap();
        for isa in Isa::available() {
            let mut got = vec![1f32; n];
            op.with_isa(isa).eval_with(&x, &mut got).unwrap();
            assert_eq!(bits(&got), bits(&want), "{label}: {isa}");
        }
    }

    #[test]
    fn blocks_starting_at_any_channel_give_the_same_values() {
        // Threads get runs of output channels that need not start on a block:
        // of MR channels, or of 64 for the kernel for few pixels.
        for (case, splits) in [
            (case(24, 21, [6, 9], false), &[1, 3, 8, 13, 20][..]),
            (case(24, 150, [1, 3], false), &[1, 16, 63, 64, 100, 149][..]),
        ] {
            for isa in Isa::available() {
                let (op, input) = operator(&case);
                let op = op.with_isa(isa);
                let x = input.try_as_plain_ram().unwrap().as_slice::<f32>().unwrap().to_vec();
                let p = op.pixels;
                let mut whole = vec![0f32; op.out_channels * p];
                op.eval_with(&x, &mut whole).unwrap();
                let mut words = vec![0u32; op.quads() * op.padded_pixels()];
                let (mut bytes, mut wide) = (vec![], vec![]);
                let packed = op.pack(Input::Values(&x), &mut words, &mut bytes, &mut wide).unwrap();
                for &split in splits {
                    let mut parts = vec![0f32; op.out_channels * p];
                    let (a, b) = parts.split_at_mut(split * p);
                    op.run_rows(packed, a, 0);
                    op.run_rows(packed, b, split);
                    assert_eq!(parts, whole, "{isa}: {p} pixels, split at channel {split}");
                }
            }
        }
        say_skipped("blocks_starting_at_any_channel_give_the_same_values");
    }

    #[test]
    #[cfg(feature = "threads")]
    fn four_threads_give_one_threads_values_on_every_isa() {
        use tract_linalg::multithread::{multithread_tract_scope, Executor};
        // Large enough for tract's threading threshold (32768 values of work).
        for case in [case(64, 96, [14, 14], false), case(32, 40, [2, 3], true)] {
            let (op, input) = operator(&case);
            let x = input.try_as_plain_ram().unwrap().as_slice::<f32>().unwrap().to_vec();
            for isa in Isa::available() {
                let op = op.with_isa(isa);
                let on = |threads: usize| {
                    let mut out = vec![0f32; op.out_channels * op.pixels];
                    multithread_tract_scope(Executor::multithread(threads), || op.eval_with(&x, &mut out)).unwrap();
                    out.iter().map(|v| v.to_bits()).collect::<Vec<_>>()
                };
                assert_eq!(on(4), on(1), "{isa}: k {} o {} hw {:?}", case.k, case.o, case.hw);
            }
        }
        say_skipped("four_threads_give_one_threads_values_on_every_isa");
    }

    /// A classifier as tract's declutter leaves it after global pooling:
    /// `[1, K, 1, 1]` from a pair, `mkba,nk->mn` with `[O, K]` weights, a
    /// `[1, O]` bias, a pair.
    fn matvec_graph(k: usize, o: usize) -> (TypedModel, Tensor) {
        let mut model = TypedModel::default();
        let mut wire = model.add_source("x", DatumType::F32.fact([1, k, 1, 1])).unwrap();
        let pair = ElementWiseOp(Box::new(QuantDequant::new(IN_STEP, 0.0, 255.0)), None);
        wire = model.wire_node("in_pair", pair, &[wire]).unwrap()[0];
        let w: Vec<f32> = ints(o * k, 21, -127, 127).iter().map(|&v| v as f32 * 0.004).collect();
        let w = model.add_const("w", Tensor::from_shape(&[o, k], &w).unwrap()).unwrap();
        let sum = EinSum { axes: "mkba,nk->mn".parse().unwrap(), operating_dt: DatumType::F32, q_params: None };
        wire = model.wire_node("fc", sum, &[wire, w]).unwrap()[0];
        let b: Vec<f32> = ints(o, 23, -50, 50).iter().map(|&v| v as f32 * 0.1).collect();
        let b = model.add_const("b", Tensor::from_shape(&[1, o], &b).unwrap()).unwrap();
        wire = model.wire_node("bias", TypedBinOp(Box::new(Add), None), &[wire, b]).unwrap()[0];
        let pair = ElementWiseOp(Box::new(QuantDequant::new(OUT_STEP, -128.0, 127.0)), None);
        wire = model.wire_node("out_pair", pair, &[wire]).unwrap()[0];
        model.select_output_outlets(&[wire]).unwrap();
        let x: Vec<f32> = ints(k, 3, -10, 265).iter().map(|&v| v as f32 * IN_STEP).collect();
        (model, Tensor::from_shape(&[1, k, 1, 1], &x).unwrap())
    }

    /// A QDQ MatMul of several rows as tract's declutter leaves it: `expr`
    /// on an activation of `x_shape` (`K` last) and weights `[K, O]` (ONNX
    /// MatMul) or `[O, K]` (Gemm with `transB`), then a bias on the last axis
    /// and a pair, which stay tract's.
    fn rowwise_graph(expr: &str, x_shape: &[usize], o: usize, k_first: bool) -> (TypedModel, Tensor) {
        let k = x_shape[x_shape.len() - 1];
        let mut model = TypedModel::default();
        let mut wire = model.add_source("x", DatumType::F32.fact(x_shape)).unwrap();
        let pair = ElementWiseOp(Box::new(QuantDequant::new(IN_STEP, 0.0, 255.0)), None);
        wire = model.wire_node("in_pair", pair, &[wire]).unwrap()[0];
        let w: Vec<f32> = ints(o * k, 21, -127, 127).iter().map(|&v| v as f32 * 0.004).collect();
        let w = match k_first {
            true => Tensor::from_shape(&[k, o], &(0..k * o).map(|i| w[(i % o) * k + i / o]).collect::<Vec<_>>()),
            false => Tensor::from_shape(&[o, k], &w),
        };
        let w = model.add_const("w", w.unwrap()).unwrap();
        let sum = EinSum { axes: expr.parse().unwrap(), operating_dt: DatumType::F32, q_params: None };
        wire = model.wire_node("fc", sum, &[wire, w]).unwrap()[0];
        let y_rank = model.outlet_fact(wire).unwrap().rank();
        let mut b_shape = vec![1; y_rank];
        b_shape[y_rank - 1] = o;
        let b: Vec<f32> = ints(o, 23, -50, 50).iter().map(|&v| v as f32 * 0.1).collect();
        let b = model.add_const("b", Tensor::from_shape(&b_shape, &b).unwrap()).unwrap();
        wire = model.wire_node("bias", TypedBinOp(Box::new(Add), None), &[wire, b]).unwrap()[0];
        let pair = ElementWiseOp(Box::new(QuantDequant::new(OUT_STEP, -128.0, 127.0)), None);
        wire = model.wire_node("out_pair", pair, &[wire]).unwrap()[0];
        model.select_output_outlets(&[wire]).unwrap();
        let n = x_shape.iter().product();
        let x: Vec<f32> = ints(n, 3, -10, 265).iter().map(|&v| v as f32 * IN_STEP).collect();
        (model, Tensor::from_shape(x_shape, &x).unwrap())
    }

    #[test]
    fn row_wise_products_match_tracts_float_sums_within_one_step() {
        let shapes: [(&str, &[usize], bool); 5] = [
            ("mk,kn->mn", &[7, 24], true),
            ("bmk,nk->bmn", &[1, 9, 33], false),
            ("bmk,kn->bmn", &[2, 5, 16], true),
            // A keyword spotter's frames: 49 rows of 40, the batch of one
            // summed away (how tract declutters an ONNX MatMul of them).
            ("bmk,kn->bmn", &[1, 49, 40], true),
            ("bmk,kn->mn", &[1, 49, 40], true),
        ];
        for (expr, x_shape, k_first) in shapes {
            let (model, input) = rowwise_graph(expr, x_shape, 10, k_first);
            let label = format!("{expr} {x_shape:?}");
            let (want, _) = run(model.clone(), &input, false);
            let (got, ops) = run(model.clone(), &input, true);
            assert!(ops.iter().any(|o| o == OP_NAME) && !ops.iter().any(|o| o.contains("MatMul")), "{label}: {ops:?}");
            // The bias (on the last axis) and the output pair are folded in.
            let passes = ops.iter().filter(|o| o.contains("Add") || o.contains("QuantDequant")).count();
            assert_eq!(passes, 1, "{label}: only the input's pair is left: {ops:?}");
            assert_close(&got, &want, OUT_STEP * 1.001, &label);
            // Every rung's kernels give the reference's bits.
            let mut model = model;
            super::super::declutter(&mut model).unwrap();
            let id = model.nodes().iter().find(|n| n.op_is::<EinSum>()).unwrap().id;
            let (op, _) = for_rowwise(&model, id).expect("a row-wise product");
            assert!(!op.dynamic, "{label}");
            assert_eq!(
                (op.in_channels, op.out_channels, op.pixels),
                (x_shape[x_shape.len() - 1], 10, input.len() / op.in_channels)
            );
            assert_isas_give_scalar_values(&op, &input, &label);
            // And with the input's grid picked per inference (a dynamically quantized model).
            let dynamic = made_dynamic(rowwise_graph(expr, x_shape, 10, k_first).0);
            let (want, _) = run(dynamic.clone(), &input, false);
            let (got, ops) = run(dynamic, &input, true);
            assert!(ops.iter().any(|o| o == OP_NAME), "dynamic, {label}: {ops:?}");
            assert_close(&got, &want, OUT_STEP * 1.001, &format!("dynamic, {label}"));
        }
    }

    #[test]
    fn classifiers_match_tracts_float_sums_within_one_step() {
        // MobileNetV2's 1280 -> 1000, digits' 384 -> 10, the vibration model's 48 -> 4.
        for (k, o) in [(1280, 1000), (384, 10), (48, 4)] {
            let (model, input) = matvec_graph(k, o);
            let label = format!("{k} -> {o}");
            assert_replaced_and_close(model.clone(), &input, OUT_STEP * 1.001, &label);
            assert_isas_give_scalar_values(&operator_of(model), &input, &label);
        }
    }

    #[test]
    fn classifiers_behind_a_flatten_are_replaced_too() {
        // Where tract's declutter keeps the flatten between the pooling's pair
        // and the classifier (aarch64, channels-first): `[1, K, 1, 1]`, the
        // pair, two axis removals, `mk,nk->mn`.
        let (k, o) = (96, 10);
        let mut model = TypedModel::default();
        let mut wire = model.add_source("x", DatumType::F32.fact([1, k, 1, 1])).unwrap();
        let pair = ElementWiseOp(Box::new(QuantDequant::new(IN_STEP, 0.0, 255.0)), None);
        wire = model.wire_node("in_pair", pair, &[wire]).unwrap()[0];
        wire = model.wire_node("flatten.0", AxisOp::Rm(3), &[wire]).unwrap()[0];
        wire = model.wire_node("flatten.1", AxisOp::Rm(2), &[wire]).unwrap()[0];
        let w: Vec<f32> = ints(o * k, 21, -127, 127).iter().map(|&v| v as f32 * 0.004).collect();
        let w = model.add_const("w", Tensor::from_shape(&[o, k], &w).unwrap()).unwrap();
        let sum = EinSum { axes: "mk,nk->mn".parse().unwrap(), operating_dt: DatumType::F32, q_params: None };
        wire = model.wire_node("fc", sum, &[wire, w]).unwrap()[0];
        let pair = ElementWiseOp(Box::new(QuantDequant::new(OUT_STEP, -128.0, 127.0)), None);
        wire = model.wire_node("out_pair", pair, &[wire]).unwrap()[0];
        model.select_output_outlets(&[wire]).unwrap();
        let x: Vec<f32> = ints(k, 3, -10, 265).iter().map(|&v| v as f32 * IN_STEP).collect();
        let input = Tensor::from_shape(&[1, k, 1, 1], &x).unwrap();
        // Replaced as it stands, flatten and all: a declutter may fold the
        // axis removals away on some CPUs, which would hide what this checks.
        let mut ours = model.clone();
        assert_eq!(replace(&mut ours).unwrap(), 1, "the classifier behind the flatten");
        ours.optimize().unwrap();
        let out = ours.into_runnable().unwrap().run(tvec!(input.clone().into_tvalue())).unwrap();
        let (want, _) = run(model, &input, false);
        assert_close(&values(&out[0]), &want, OUT_STEP * 1.001, "behind a flatten");
    }

    #[test]
    fn leaves_sums_it_cannot_compute_exactly_to_tract() {
        // Weights that are no whole multiples of one step per channel.
        let (mut model, _) = graph(&case(8, 4, [2, 2], false));
        super::super::declutter(&mut model).unwrap();
        let id = model.nodes().iter().find(|n| n.op_is::<EinSum>()).unwrap().id;
        let w = model.node(id).inputs[1];
        let mut patch = TypedModelPatch::default();
        let odd: Vec<f32> = (0..32).map(|i| 0.1 + (i as f32).sqrt() * 0.0137).collect();
        let konst = patch.add_const("odd", Tensor::from_shape(&[4, 8], &odd).unwrap()).unwrap();
        patch.shunt_outside(&model, w, konst).unwrap();
        patch.apply(&mut model).unwrap();
        assert!(for_einsum(&model, id).is_none(), "off-grid weights");

        // An input that no quantize/dequantize pair produced.
        let mut model = TypedModel::default();
        let x = model.add_source("x", DatumType::F32.fact([8, 2, 2])).unwrap();
        let w = model.add_const("w", Tensor::from_shape(&[4, 8], &[0.5f32; 32]).unwrap()).unwrap();
        let sum = EinSum { axes: "IHW,OI->OHW".parse().unwrap(), operating_dt: DatumType::F32, q_params: None };
        let out = model.wire_node("sum", sum, &[x, w]).unwrap()[0];
        model.select_output_outlets(&[out]).unwrap();
        assert_eq!(replace(&mut model).unwrap(), 0, "input on no grid");
    }

    #[test]
    fn integer_weights_recovers_symmetric_int8_steps() {
        let step = 0.0123f32;
        let row: Vec<f32> = [-127, -3, 0, 64, 127, 5].iter().map(|&q| q as f32 * step).collect();
        let (scale, q) = integer_weights(&row, largest(&row)).unwrap();
        assert_eq!(q, [-127, -3, 0, 64, 127, 5]);
        assert!((scale - step).abs() < 1e-7);
        // A largest magnitude of 128 steps (-128), as an asymmetric range can give.
        let row: Vec<f32> = [-128, 100, 1].iter().map(|&q| q as f32 * step).collect();
        assert_eq!(integer_weights(&row, 128.0 * step).unwrap().1, [-128, 100, 1]);
        // Per tensor: this channel's largest is 60 steps of the tensor's 127.
        let row: Vec<f32> = [-60, 3, 17].iter().map(|&q| q as f32 * step).collect();
        assert_eq!(integer_weights(&row, 127.0 * step).unwrap().1, [-60, 3, 17]);
        assert_eq!(integer_weights(&[0.0, 0.0], 1.0).unwrap().1, [0, 0]);
        assert!(integer_weights(&[1.0, 0.3333], 1.0).is_none());
        assert!(integer_weights(&[f32::NAN, 1.0], f32::NAN).is_none());
    }

    #[test]
    fn indices_on_the_output_grid_give_the_values_bit_for_bit() {
        // Both kernels (and the plain loops): 1x1 cases of 4 to 256 pixels.
        for case in cases().into_iter().filter(|c| c.qdq) {
            let (op, input) = operator(&case);
            let x = input.try_as_plain_ram().unwrap().as_slice::<f32>().unwrap().to_vec();
            let n = op.out_channels * op.pixels;
            let qd = op.epi.qdq.unwrap();
            let narrow = Int8Conv { out_u8: true, ..op.clone() };
            for isa in Isa::available() {
                let (mut values, mut indices) = (vec![0f32; n], vec![0u8; n]);
                op.with_isa(isa).eval_with(&x, &mut values).unwrap();
                narrow.with_isa(isa).eval_with(&x, &mut indices).unwrap();
                let back: Vec<u32> = indices.iter().map(|&i| ((i as f32 + qd.lo) * qd.scale).to_bits()).collect();
                let want: Vec<u32> = values.iter().map(|v| v.to_bits()).collect();
                assert_eq!(back, want, "k {} o {} hw {:?} {isa}", case.k, case.o, case.hw);
            }
        }
    }

    #[test]
    fn indices_on_a_grid_of_fewer_levels_are_clamped_alike_on_every_isa() {
        // A byte grid of 101 levels from -20: the top index (100) and the low
        // end are the ARM blocks' integer clamp, which a full grid only
        // meets at 255.
        let grid = QuantDequant::new(0.05, -20.0, 80.0);
        let (mut bottom, mut top) = (false, false);
        for case in cases().into_iter().filter(|c| c.qdq) {
            let (op, input) = operator(&case);
            let x = input.try_as_plain_ram().unwrap().as_slice::<f32>().unwrap().to_vec();
            let n = op.out_channels * op.pixels;
            let narrow = Int8Conv { out_u8: true, epi: Epilogue { qdq: Some(grid), ..op.epi }, ..op.clone() };
            let mut want = vec![0u8; n];
            narrow.with_isa(Isa::Scalar).eval_with(&x, &mut want).unwrap();
            assert!(want.iter().all(|&i| i <= 100));
            (bottom, top) = (bottom || want.contains(&0), top || want.contains(&100));
            for isa in Isa::available() {
                let mut got = vec![7u8; n];
                narrow.with_isa(isa).eval_with(&x, &mut got).unwrap();
                assert_eq!(got, want, "k {} o {} hw {:?} {isa}", case.k, case.o, case.hw);
            }
        }
        assert!(bottom && top, "the cases reach both ends of the grid");
    }

    #[test]
    fn a_depthwise_convolution_reads_and_writes_indices_with_the_same_results() {
        if !super::super::depthwise::cpu_supported() {
            eprintln!("skipped: our depthwise operator does not run on this CPU");
            return;
        }
        use tract_core::ops::cnn::PoolSpec;
        for (stride, hw) in [(1, [9, 13]), (2, [14, 14]), (2, [7, 9])] {
            let case = Case { clip: Some((0.0, 6.0)), ..case(12, 20, hw, false) };
            let (mut model, input) = graph(&case);
            // Then a 3x3 depthwise convolution, padded by 1, a clip and a pair.
            let mut wire = model.output_outlets().unwrap()[0];
            let c = case.o;
            let k = model.add_const("dw_w", Tensor::from_shape(&[c, 1, 3, 3], &weights_of(c * 9)).unwrap()).unwrap();
            let b = model.add_const("dw_b", Tensor::from_shape(&[c], &weights_of(c)).unwrap()).unwrap();
            let padding = PaddingSpec::Explicit(tvec![1, 1], tvec![1, 1]);
            let spec = PoolSpec::new(DataFormat::CHW, tvec![3, 3], padding, None, Some(tvec![stride, stride]), c, c);
            wire = model.wire_node("dw", Conv::new(spec, KernelFormat::OIHW, c, None), &[wire, k, b]).unwrap()[0];
            let pair = ElementWiseOp(Box::new(QuantDequant::new(0.07, -128.0, 127.0)), None);
            wire = model.wire_node("dw_pair", pair, &[wire]).unwrap()[0];
            // Then a 1x1 int8 convolution (whole steps of 0.004) and its pair.
            let q = ints(9 * c, 21, -127, 127);
            let w: Vec<f32> = q.iter().map(|&v| v as f32 * 0.004).collect();
            let w = model.add_const("pw_w", Tensor::from_shape(&[9, c], &w).unwrap()).unwrap();
            let sum = EinSum { axes: "IHW,OI->OHW".parse().unwrap(), operating_dt: DatumType::F32, q_params: None };
            wire = model.wire_node("pw", sum, &[wire, w]).unwrap()[0];
            let pair = ElementWiseOp(Box::new(QuantDequant::new(0.09, -128.0, 127.0)), None);
            wire = model.wire_node("pw_pair", pair, &[wire]).unwrap()[0];
            model.select_output_outlets(&[wire]).unwrap();
            super::super::declutter(&mut model).unwrap();
            assert_eq!(super::super::depthwise::use_for_depthwise_convs(&mut model).unwrap(), 1);
            assert_eq!(replace(&mut model).unwrap(), 2);
            let mut narrowed = model.clone();
            // Both edges of the depthwise operator.
            assert_eq!(narrow_edges(&mut narrowed).unwrap(), 2, "stride {stride} hw {hw:?}");
            let bytes =
                |m: &TypedModel| m.nodes().iter().filter(|n| n.outputs[0].fact.datum_type == DatumType::U8).count();
            assert_eq!(bytes(&narrowed), 2);
            let convs: Vec<&Int8Conv> = narrowed.nodes().iter().filter_map(|n| n.op_as::<Int8Conv>()).collect();
            assert!(convs.iter().any(|c| c.out_u8) && convs.iter().any(|c| c.input_u8));
            let run = |model: TypedModel| {
                let out = model.into_runnable().unwrap().run(tvec!(input.clone().into_tvalue())).unwrap();
                values(&out[0]).iter().map(|v| v.to_bits()).collect::<Vec<_>>()
            };
            let (want, got) = (run(model.clone()), run(narrowed.clone()));
            assert_eq!(got, want, "stride {stride} hw {hw:?}");
            // Once only.
            assert_eq!(narrow_edges(&mut narrowed).unwrap(), 0);
        }
    }

    /// Deterministic weights in [-0.5, 0.5).
    fn weights_of(n: usize) -> Vec<f32> {
        ints(n, 13, -50, 49).iter().map(|&v| v as f32 / 100.0).collect()
    }
}
