//! The x86 256-bit block loops of [`Int8Conv`]: AVX-VNNI's `vpdpbusd` on
//! the packed quads where the CPU has it (Alder Lake and later, N100-class
//! mini PCs), and AVX2's `vpmaddwd` on their even and odd bytes widened to
//! 16 bits where it does not (Haswell to Zen 3).
//!
//! Both sum blocks of 8 output channels by 8 pixels, one register of eight
//! 32-bit sums per channel, starting from the zero correction, and hand each
//! row to the scalar reference's epilogue, so every variant stores the same
//! bits. `vpmaddubsw`, the usual AVX2 int8 product, is not used: it adds
//! two products of a byte (up to 255) and an int8 in 16 bits, which
//! saturates; `vpmaddwd` on 16-bit values is exact.

use std::arch::x86_64::*;

use super::super::epilogue::Applied;
use super::{Im2col, Int8Conv, Out, MR, NR, PX};

/// The weights as [`run`] reads them: per quad and output channel, the
/// bytes of channels 0 and 2 of the quad as two i16 (one 32-bit word), then
/// those of channels 1 and 3, `[quads][O + MR][4]`.
pub(super) fn split_weights(weights: &[u32], opad: usize) -> Vec<i16> {
    let mut split = Vec::with_capacity(weights.len() * 4);
    for w in weights {
        let b = w.to_le_bytes().map(|b| b as i8 as i16);
        split.extend([b[0], b[2], b[1], b[3]]);
    }
    debug_assert_eq!(split.len() % (4 * opad), 0);
    split
}

/// [`Int8Conv::pack_plain`] compiled for AVX2.
///
/// # Safety
/// The CPU must have AVX2 and FMA.
#[target_feature(enable = "avx2,fma")]
pub(super) unsafe fn pack(op: &Int8Conv, x: &[f32], packed: &mut [u32]) {
    op.pack_plain(x, packed)
}

/// [`Int8Conv::pack_plain_indices`] compiled for AVX2.
///
/// # Safety
/// The CPU must have AVX2 and FMA.
#[target_feature(enable = "avx2,fma")]
pub(super) unsafe fn pack_indices(op: &Int8Conv, x: &[u8], packed: &mut [u32]) {
    op.pack_plain_indices(x, packed)
}

/// [`Int8Conv::fill_planes`] then [`Int8Conv::pack_im2col`], compiled for AVX2.
///
/// # Safety
/// The CPU must have AVX2 and FMA.
#[target_feature(enable = "avx2,fma")]
pub(super) unsafe fn pack_im2col(op: &Int8Conv, g: &Im2col, x: &[f32], bytes: &mut Vec<u8>, packed: &mut [u32]) {
    op.fill_planes(g, x, bytes);
    op.pack_im2col(g, bytes, packed)
}

/// One row's sums, one register, through [`super::finish_row`].
#[inline(always)]
unsafe fn store_row<T: Out, const CLAMP: bool, const QDQ: bool>(
    acc: __m256i,
    mul: f32,
    bias: f32,
    epi: Applied,
    out: *mut T,
    n: usize,
) {
    let mut sums = [0i32; PX];
    _mm256_storeu_si256(sums.as_mut_ptr() as *mut __m256i, acc);
    super::finish_row::<T, CLAMP, QDQ>(&sums, mul, bias, epi, out, n);
}

/// [`Int8Conv::run_plain`] with AVX2's `vpmaddwd`.
///
/// # Safety
/// The CPU must have AVX2 and FMA; `packed` holds the op's packed input
/// ([`Int8Conv::word_at`] layout, whole blocks), the op's `weights16` are
/// [`split_weights`], and `out` holds whole rows of `pixels` values for
/// channels `first..`.
#[target_feature(enable = "avx2,fma")]
pub(super) unsafe fn run<T: Out>(op: &Int8Conv, packed: &[u32], out: &mut [T], first: usize) {
    by_epilogue!(run_avx2, op, packed, out, first)
}

/// [`Int8Conv::run_plain`] with AVX-VNNI's `vpdpbusd`.
///
/// # Safety
/// As [`run`], with AVX-VNNI too (the op's `weights16` are not read).
#[target_feature(enable = "avx2,fma,avxvnni")]
pub(super) unsafe fn run_vnni<T: Out>(op: &Int8Conv, packed: &[u32], out: &mut [T], first: usize) {
    by_epilogue!(run_avxvnni, op, packed, out, first)
}

#[target_feature(enable = "avx2,fma")]
unsafe fn run_avx2<T: Out, const CLAMP: bool, const QDQ: bool>(
    op: &Int8Conv,
    packed: &[u32],
    out: &mut [T],
    first: usize,
) {
    blocks::<T, CLAMP, QDQ, false>(op, packed, out, first)
}

#[target_feature(enable = "avx2,fma,avxvnni")]
unsafe fn run_avxvnni<T: Out, const CLAMP: bool, const QDQ: bool>(
    op: &Int8Conv,
    packed: &[u32],
    out: &mut [T],
    first: usize,
) {
    blocks::<T, CLAMP, QDQ, true>(op, packed, out, first)
}

/// The block loops, compiled into each caller's instruction set.
#[inline(always)]
unsafe fn blocks<T: Out, const CLAMP: bool, const QDQ: bool, const VNNI: bool>(
    op: &Int8Conv,
    packed: &[u32],
    out: &mut [T],
    first: usize,
) {
    let (p, opad, quads) = (op.pixels, op.out_channels + MR, op.quads());
    let channels = out.len() / p;
    assert!(packed.len() >= quads * op.padded_pixels());
    op.check_channels(first, channels);
    assert!(VNNI || op.weights16.len() >= 4 * quads * opad);
    let epi = op.epi.by_value();
    let out = out.as_mut_ptr();
    let low_bytes = _mm256_set1_epi16(0xff);
    let pairs = op.weights16.as_ptr() as *const i32;
    for px in (0..p).step_by(PX) {
        let n = (p - px).min(PX);
        let mut o = 0;
        while o < channels {
            let rows = (channels - o).min(MR);
            let mut acc = [_mm256_setzero_si256(); MR];
            for (r, acc) in acc.iter_mut().enumerate().take(rows) {
                *acc = _mm256_set1_epi32(op.corr[first + o + r]);
            }
            let mut xs = packed.as_ptr().add(op.word_at(0, px));
            for quad in 0..quads {
                let x = _mm256_loadu_si256(xs as *const __m256i);
                if VNNI {
                    let ws = op.weights.as_ptr().add(quad * opad + first + o);
                    for (r, acc) in acc.iter_mut().enumerate() {
                        *acc = _mm256_dpbusd_avx_epi32(*acc, x, _mm256_set1_epi32(*ws.add(r) as i32));
                    }
                } else {
                    // Bytes 0 and 2 of each word, and 1 and 3, as 16-bit values.
                    let even = _mm256_and_si256(x, low_bytes);
                    let odd = _mm256_srli_epi16::<8>(x);
                    let ws = pairs.add(2 * (quad * opad + first + o));
                    for (r, acc) in acc.iter_mut().enumerate() {
                        let we = _mm256_set1_epi32(ws.add(2 * r).read_unaligned());
                        let wo = _mm256_set1_epi32(ws.add(2 * r + 1).read_unaligned());
                        let sum = _mm256_add_epi32(_mm256_madd_epi16(even, we), _mm256_madd_epi16(odd, wo));
                        *acc = _mm256_add_epi32(*acc, sum);
                    }
                }
                xs = xs.add(NR);
            }
            store_rows!(op, acc, rows, first, o, out, p, px, n, epi, [0 1 2 3 4 5 6 7]);
            o += MR;
        }
    }
}
