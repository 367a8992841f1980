//! Products of block-quantized weights (`crate::quant`) with activations kept in f32: the
//! `activations="f32"` option, for results that follow the dequantized model to f32 rounding
//! (the int8 path rounds every activation to 8 bits, which a real model's logits show at the
//! 1e-1 level).
//!
//! Each weight group decodes to f32 exactly as dequantization defines it
//! (w_j = scale[j / 16] * q_j - min), and the dot product accumulates w_j * x_j into eight f32
//! lanes (lane j % 8) over the row's groups in order, then takes the fixed pairwise lane sum.
//! That order does not depend on the batch, tile or thread, so batch invariance holds bit for
//! bit. The AVX2 tiles decode each group with the formats' SIMD decoders; the float
//! arithmetic per weight is about what the int8 path's integer arithmetic is, but it reads
//! activations 4x wider.

use super::portable::{lane_fma, lane_sum};
use crate::quant::{BlockFormat, GROUP};
use crate::tensor::WeightFormat;
use crate::with_block_format;

/// One register tile: R weight rows starting at `w` (stride `row_bytes`) against B rows of x
/// starting at `x` (stride `cols`).
#[inline(always)]
unsafe fn tile_body<F: BlockFormat, const R: usize, const B: usize>(w: *const u8, row_bytes: usize, cols: usize, x: *const f32, out: *mut f32, ldo: usize) {
    let per_block = F::WEIGHTS / GROUP;
    let mut acc = [[[0f32; 8]; B]; R];
    for g in 0..cols / GROUP {
        let offset = g / per_block * F::BYTES;
        let wf: [[f32; GROUP]; R] = std::array::from_fn(|r| {
            let group = F::group(std::slice::from_raw_parts(w.add(r * row_bytes + offset), F::BYTES), g % per_block);
            std::array::from_fn(|j| group.weight(j))
        });
        for b in 0..B {
            let xs = std::slice::from_raw_parts(x.add(b * cols + g * GROUP), GROUP);
            for r in 0..R {
                for j in 0..GROUP {
                    acc[r][b][j % 8] = lane_fma(wf[r][j], xs[j], acc[r][b][j % 8]);
                }
            }
        }
    }
    for r in 0..R {
        for b in 0..B {
            *out.add(b * ldo + r) = lane_sum(&acc[r][b]);
        }
    }
}

unsafe fn tile_portable<F: BlockFormat, const R: usize, const B: usize>(w: *const u8, row_bytes: usize, cols: usize, x: *const f32, out: *mut f32, ldo: usize) {
    tile_body::<F, R, B>(w, row_bytes, cols, x, out, ldo)
}

unsafe fn portable_of<F: BlockFormat>(nr: usize, nb: usize, w: *const u8, row_bytes: usize, cols: usize, x: *const f32, out: *mut f32, ldo: usize) {
    dispatch!(tile_portable [F], nr, nb, w, row_bytes, cols, x, out, ldo)
}

/// Portable tile for `format`: weight rows row0.. (nr of them) against nb rows of x.
pub unsafe fn tile(format: WeightFormat, bytes: &[u8], row0: usize, cols: usize, x: *const f32, nr: usize, nb: usize, out: *mut f32, ldo: usize) {
    let row_bytes = format.row_bytes(cols);
    let w = bytes.as_ptr().add(row0 * row_bytes);
    with_block_format!(format, F => portable_of::<F>(nr, nb, w, row_bytes, cols, x, out, ldo))
}

#[cfg(target_arch = "x86_64")]
pub mod avx2 {
    use std::arch::x86_64::*;

    use crate::backend::cpu::matmul::avx2::hsum;
    use crate::quant::{q4_0, q4_k, q5_0, q6_k, q8_0, BlockFormat, GROUP};
    use crate::tensor::WeightFormat;

    /// The tile of `tile_body` with the formats' SIMD group decoders: a group's 32 weights
    /// become four vectors of 8 f32 (w = scale * q - min, the same two roundings as
    /// `Group::weight`), each fused-multiplied into the one accumulator of lanes j % 8.
    macro_rules! avx2_tile {
        ($name:ident, $F:ty, $decode:path) => {
            #[target_feature(enable = "avx2,fma,f16c")]
            unsafe fn $name<const R: usize, const B: usize>(w: *const u8, row_bytes: usize, cols: usize, x: *const f32, out: *mut f32, ldo: usize) {
                let per_block = <$F>::WEIGHTS / GROUP;
                let mut acc = [[_mm256_setzero_ps(); B]; R];
                for g in 0..cols / GROUP {
                    let offset = g / per_block * <$F>::BYTES;
                    let mut wv = [[_mm256_setzero_ps(); 4]; R];
                    for r in 0..R {
                        _mm_prefetch::<_MM_HINT_T0>(w.add((r + R) * row_bytes + offset) as *const i8);
                        let (q, scale, min) = $decode(w.add(r * row_bytes + offset), g % per_block);
                        // scale lanes 0-3 hold the first 16 weights' scale, 4-7 the second's
                        let halves = [_mm256_permutevar8x32_ps(scale, _mm256_set1_epi32(0)), _mm256_permutevar8x32_ps(scale, _mm256_set1_epi32(4))];
                        let min = _mm256_set1_ps(min);
                        let (lo, hi) = (_mm256_castsi256_si128(q), _mm256_extracti128_si256::<1>(q));
                        let chunks = [lo, _mm_srli_si128::<8>(lo), hi, _mm_srli_si128::<8>(hi)];
                        for c in 0..4 {
                            let qf = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(chunks[c]));
                            wv[r][c] = _mm256_sub_ps(_mm256_mul_ps(halves[c / 2], qf), min);
                        }
                    }
                    for b in 0..B {
                        let xs = x.add(b * cols + g * GROUP);
                        for c in 0..4 {
                            let xv = _mm256_loadu_ps(xs.add(8 * c));
                            for r in 0..R {
                                acc[r][b] = _mm256_fmadd_ps(wv[r][c], xv, acc[r][b]);
                            }
                        }
                    }
                }
                for r in 0..R {
                    for b in 0..B {
                        *out.add(b * ldo + r) = hsum(acc[r][b]);
                    }
                }
            }
        };
    }

    avx2_tile!(tile_q8_0, q8_0::Q8_0, q8_0::avx2::group);
    avx2_tile!(tile_q4_0, q4_0::Q4_0, q4_0::avx2::group);
    avx2_tile!(tile_q5_0, q5_0::Q5_0, q5_0::avx2::group);
    avx2_tile!(tile_q4_k, q4_k::Q4K, q4_k::avx2::group);
    avx2_tile!(tile_q6_k, q6_k::Q6K, q6_k::avx2::group);

    /// AVX2 tile for `format` (see `super::tile`).
    pub unsafe fn tile(format: WeightFormat, bytes: &[u8], row0: usize, cols: usize, x: *const f32, nr: usize, nb: usize, out: *mut f32, ldo: usize) {
        let row_bytes = format.row_bytes(cols);
        let w = bytes.as_ptr().add(row0 * row_bytes);
        match format {
            WeightFormat::Q8_0 => dispatch!(tile_q8_0, nr, nb, w, row_bytes, cols, x, out, ldo),
            WeightFormat::Q4_0 => dispatch!(tile_q4_0, nr, nb, w, row_bytes, cols, x, out, ldo),
            WeightFormat::Q5_0 => dispatch!(tile_q5_0, nr, nb, w, row_bytes, cols, x, out, ldo),
            WeightFormat::Q4K => dispatch!(tile_q4_k, nr, nb, w, row_bytes, cols, x, out, ldo),
            WeightFormat::Q6K => dispatch!(tile_q6_k, nr, nb, w, row_bytes, cols, x, out, ldo),
            other => unreachable!("{} is not a block format", other.name()),
        }
    }
}
