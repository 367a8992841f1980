//! Products of block-quantized weights (`crate::quant`) with activations quantized to int8.
//!
//! Each row of x is quantized in groups of 32 (x_j ~ d * q_j, d = max|x| / 127, q rounded
//! half away from zero), once per product. A weight group decodes to integers and scales
//! (w_j = scale[j / 16] * q_j - min), so the product of one weight group with one activation
//! group is eight exact integer lane sums L_l = sum of w_q * x_q over j = 4l .. 4l + 3, then
//!     acc_l = fma(scale[l / 4] * d, L_l, acc_l)        (eight f32 lanes)
//!     acc_min = fma(min * d, sum_j x_q, acc_min)        (formats with an offset)
//! over the row's groups in order, and the output is lane_sum(acc) - acc_min. That order is
//! fixed whatever the batch, tile or thread, so batch invariance holds bit for bit. The x86
//! kernels take the integer sums of |w| times x signed by w with AVX2 `maddubs`/`madd` or with
//! one VNNI `vpdpbusd` (AVX-VNNI or AVX-512 VNNI), exact either way, so every x86 family gives
//! the same bits; the portable kernels compute the same integers in plain Rust (NEON on
//! aarch64).

use super::portable::{lane_fma, lane_sum};
use crate::quant::{BlockFormat, GROUP};
use crate::tensor::WeightFormat;
use crate::with_block_format;

/// 32 activations as int8: x_j ~ d * q_j, and sum = sum of q_j.
#[repr(C)]
#[derive(Clone, Copy)]
pub struct ActGroup {
    pub d: f32,
    pub sum: i32,
    pub q: [i8; GROUP],
}

/// The groups of every row of x (batch, cols), row after row; cols is a multiple of 32.
pub fn quantize_acts(x: &[f32], cols: usize) -> Vec<ActGroup> {
    debug_assert_eq!(cols % GROUP, 0);
    x.chunks_exact(GROUP)
        .map(|v| {
            let amax = v.iter().fold(0f32, |m, a| m.max(a.abs()));
            let d = amax / 127.0;
            let id = if d != 0.0 { 1.0 / d } else { 0.0 };
            let q: [i8; GROUP] = std::array::from_fn(|j| (v[j] * id).round() as i8);
            ActGroup { d, sum: q.iter().map(|&v| v as i32).sum(), q }
        })
        .collect()
}

/// One portable register tile: weight rows starting at `w` (stride `row_bytes`) against B
/// rows of activation groups starting at `acts` (stride `groups`).
unsafe fn tile_portable<F: BlockFormat, const R: usize, const B: usize>(w: *const u8, row_bytes: usize, groups: usize, acts: *const ActGroup, out: *mut f32, ldo: usize) {
    let per_block = F::WEIGHTS / GROUP;
    let mut acc = [[[0f32; 8]; B]; R];
    let mut acc_min = [[0f32; B]; R];
    for g in 0..groups {
        let offset = g / per_block * F::BYTES;
        let wg: [crate::quant::Group; R] = std::array::from_fn(|r| F::group(std::slice::from_raw_parts(w.add(r * row_bytes + offset), F::BYTES), g % per_block));
        for b in 0..B {
            let a = &*acts.add(b * groups + g);
            for r in 0..R {
                let mut lanes = [0i32; 8];
                for (l, lane) in lanes.iter_mut().enumerate() {
                    for j in 4 * l..4 * l + 4 {
                        *lane += wg[r].q[j] as i32 * a.q[j] as i32;
                    }
                }
                for l in 0..8 {
                    acc[r][b][l] = lane_fma(wg[r].scale[l / 4] * a.d, lanes[l] as f32, acc[r][b][l]);
                }
                if F::HAS_MIN {
                    acc_min[r][b] = lane_fma(wg[r].min * a.d, a.sum as f32, acc_min[r][b]);
                }
            }
        }
    }
    for r in 0..R {
        for b in 0..B {
            *out.add(b * ldo + r) = lane_sum(&acc[r][b]) - acc_min[r][b];
        }
    }
}

unsafe fn portable_of<F: BlockFormat>(nr: usize, nb: usize, w: *const u8, row_bytes: usize, groups: usize, acts: *const ActGroup, out: *mut f32, ldo: usize) {
    match (nr, nb) {
        (1, 1) => tile_portable::<F, 1, 1>(w, row_bytes, groups, acts, out, ldo),
        (1, 2) => tile_portable::<F, 1, 2>(w, row_bytes, groups, acts, out, ldo),
        (2, 1) => tile_portable::<F, 2, 1>(w, row_bytes, groups, acts, out, ldo),
        (2, 2) => tile_portable::<F, 2, 2>(w, row_bytes, groups, acts, out, ldo),
        (3, 1) => tile_portable::<F, 3, 1>(w, row_bytes, groups, acts, out, ldo),
        (3, 2) => tile_portable::<F, 3, 2>(w, row_bytes, groups, acts, out, ldo),
        (4, 1) => tile_portable::<F, 4, 1>(w, row_bytes, groups, acts, out, ldo),
        (4, 2) => tile_portable::<F, 4, 2>(w, row_bytes, groups, acts, out, ldo),
        _ => unreachable!("tile {nr}x{nb} out of range"),
    }
}

/// Portable tile for `format`: weight rows row0.. (nr of them) against nb activation rows.
pub unsafe fn tile(format: WeightFormat, bytes: &[u8], row0: usize, cols: usize, acts: *const ActGroup, nr: usize, nb: usize, out: *mut f32, ldo: usize) {
    let row_bytes = format.row_bytes(cols);
    let w = bytes.as_ptr().add(row0 * row_bytes);
    with_block_format!(format, F => portable_of::<F>(nr, nb, w, row_bytes, cols / GROUP, acts, out, ldo))
}

/// One x86 register tile of block format `$F` with group decoder `$decode`, compiled for
/// `$features`; `$lanes(mag, sx)` gives the eight i32 lane sums of |w| (u8) times x signed by w
/// (s8), byte 4l..4l+3 into lane l. `$nonneg`: the decoder yields q >= 0 (Q4_K), so |w| = q
/// and x needs no sign. The integer sums are exact in every family (`maddubs` cannot saturate:
/// a pair is at most 2 * 128 * 127 = 32512, q8_0's -128 included, against activations of
/// magnitude <= 127), so all x86 families give bit-identical outputs: the same integers, then
/// the same f32 operations in the same order.
#[cfg(target_arch = "x86_64")]
macro_rules! x86_tile {
    ($name:ident, $F:ty, $decode:path, $nonneg:literal, $features:literal, $lanes:ident) => {
        #[target_feature(enable = $features)]
        unsafe fn $name<const R: usize, const B: usize>(w: *const u8, row_bytes: usize, groups: usize, acts: *const ActGroup, out: *mut f32, ldo: usize) {
            let per_block = <$F>::WEIGHTS / GROUP;
            let mut acc = [[_mm256_setzero_ps(); B]; R];
            let mut acc_min = [[0f32; B]; R];
            for g in 0..groups {
                let offset = g / per_block * <$F>::BYTES;
                let mut q = [_mm256_setzero_si256(); R];
                let mut mag = [_mm256_setzero_si256(); R];
                let mut scale = [_mm256_setzero_ps(); R];
                let mut min = [0f32; R];
                for r in 0..R {
                    // The next tile's rows at this offset: one tile ahead, which hides the
                    // memory latency that the hardware prefetchers leave (~2x at batch 1).
                    _mm_prefetch::<_MM_HINT_T0>(w.add((r + R) * row_bytes + offset) as *const i8);
                    (q[r], scale[r], min[r]) = $decode(w.add(r * row_bytes + offset), g % per_block);
                    mag[r] = if $nonneg { q[r] } else { _mm256_sign_epi8(q[r], q[r]) };
                }
                for b in 0..B {
                    let a = acts.add(b * groups + g);
                    let xq = _mm256_loadu_si256((*a).q.as_ptr() as *const __m256i);
                    let d = _mm256_set1_ps((*a).d);
                    for r in 0..R {
                        let sx = if $nonneg { xq } else { _mm256_sign_epi8(xq, q[r]) };
                        let lanes = _mm256_cvtepi32_ps($lanes(mag[r], sx));
                        acc[r][b] = _mm256_fmadd_ps(_mm256_mul_ps(scale[r], d), lanes, acc[r][b]);
                        if <$F>::HAS_MIN {
                            acc_min[r][b] = (min[r] * (*a).d).mul_add((*a).sum as f32, acc_min[r][b]);
                        }
                    }
                }
            }
            for r in 0..R {
                for b in 0..B {
                    *out.add(b * ldo + r) = hsum(acc[r][b]) - acc_min[r][b];
                }
            }
        }
    };
}

/// A module of x86 int8 tiles for every block format (see `x86_tile!`) and its `tile` entry.
#[cfg(target_arch = "x86_64")]
macro_rules! x86_family {
    ($(#[$doc:meta])* $module:ident, $features:literal, |$mag:ident, $sx:ident| $lanes:expr) => {
        $(#[$doc])*
        pub mod $module {
            use std::arch::x86_64::*;

            use super::ActGroup;
            use crate::backend::cpu::matmul::avx2::hsum;
            use crate::quant::{q4_0, q4_k, q5_0, q6_k, q8_0, BlockFormat, GROUP};
            use crate::tensor::WeightFormat;

            /// The eight i32 lane sums of u8 `mag` times s8 `sx`.
            #[target_feature(enable = $features)]
            #[inline]
            unsafe fn lanes($mag: __m256i, $sx: __m256i) -> __m256i {
                $lanes
            }

            x86_tile!(tile_q8_0, q8_0::Q8_0, q8_0::avx2::group, false, $features, lanes);
            x86_tile!(tile_q4_0, q4_0::Q4_0, q4_0::avx2::group, false, $features, lanes);
            x86_tile!(tile_q5_0, q5_0::Q5_0, q5_0::avx2::group, false, $features, lanes);
            x86_tile!(tile_q4_k, q4_k::Q4K, q4_k::avx2::group, true, $features, lanes);
            x86_tile!(tile_q6_k, q6_k::Q6K, q6_k::avx2::group, false, $features, lanes);

            /// The tile for `format` (see `super::tile`).
            pub unsafe fn tile(format: WeightFormat, bytes: &[u8], row0: usize, cols: usize, acts: *const ActGroup, nr: usize, nb: usize, out: *mut f32, ldo: usize) {
                let row_bytes = format.row_bytes(cols);
                let w = bytes.as_ptr().add(row0 * row_bytes);
                let groups = cols / GROUP;
                match format {
                    WeightFormat::Q8_0 => dispatch!(tile_q8_0, nr, nb, w, row_bytes, groups, acts, out, ldo),
                    WeightFormat::Q4_0 => dispatch!(tile_q4_0, nr, nb, w, row_bytes, groups, acts, out, ldo),
                    WeightFormat::Q5_0 => dispatch!(tile_q5_0, nr, nb, w, row_bytes, groups, acts, out, ldo),
                    WeightFormat::Q4K => dispatch!(tile_q4_k, nr, nb, w, row_bytes, groups, acts, out, ldo),
                    WeightFormat::Q6K => dispatch!(tile_q6_k, nr, nb, w, row_bytes, groups, acts, out, ldo),
                    other => unreachable!("{} is not a block format", other.name()),
                }
            }
        }
    };
}

#[cfg(target_arch = "x86_64")]
x86_family!(
    /// AVX2: pairs of products with `maddubs` (to i16), then pairs of pairs with `madd`.
    avx2,
    "avx2,fma,f16c",
    |mag, sx| _mm256_madd_epi16(_mm256_maddubs_epi16(mag, sx), _mm256_set1_epi16(1))
);

#[cfg(target_arch = "x86_64")]
x86_family!(
    /// AVX-VNNI (VEX `vpdpbusd`): the four products of a lane summed in one instruction.
    avx_vnni,
    "avx2,fma,f16c,avxvnni",
    |mag, sx| _mm256_dpbusd_avx_epi32(_mm256_setzero_si256(), mag, sx)
);

#[cfg(target_arch = "x86_64")]
x86_family!(
    /// AVX-512 VNNI on 256-bit registers (EVEX `vpdpbusd`; Cascade Lake, Ice Lake, Sapphire
    /// Rapids and later, Zen 4 and 5). Preferred to AVX-VNNI where both exist: EVEX code may
    /// use 32 vector registers.
    avx512_vnni,
    "avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512vnni",
    |mag, sx| _mm256_dpbusd_epi32(_mm256_setzero_si256(), mag, sx)
);

/// AVX-512 VNNI on 512-bit registers, two (weight row, batch row) pairs per instruction. Batched (B > 1) the halves of a register hold two batch rows against one weight
/// row; at B = 1 two weight rows against the row of x. Each half computes exactly what the
/// 256-bit tiles compute for its pair (the same exact integer lane sums from `vpdpbusd`, the
/// same f32 multiply, fused multiply-add and horizontal sum in the same order), so this family
/// gives the AVX2 family's bits too. Odd tiles pair the last row with itself and drop the copy.
/// Not chosen automatically: on the Xeon this was measured on it is no faster than the 256-bit
/// VNNI tiles (port 1's vector units are off while 512-bit instructions run, and the kernel is
/// bound by all its vector instructions, decoding and f32 conversion included, not by
/// `vpdpbusd`); `UPG_BATCH_SIMD=avx512-vnni-zmm` selects it.
#[cfg(target_arch = "x86_64")]
pub mod avx512_vnni_zmm {
    use std::arch::x86_64::*;

    use super::ActGroup;
    use crate::backend::cpu::matmul::avx2::hsum;
    use crate::quant::{q4_0, q4_k, q5_0, q6_k, q8_0, BlockFormat, GROUP};
    use crate::tensor::WeightFormat;

    /// The 512-bit register with `lo` in the low half and `hi` in the high half.
    #[target_feature(enable = "avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512vnni")]
    #[inline]
    unsafe fn join_i(lo: __m256i, hi: __m256i) -> __m512i {
        _mm512_inserti64x4::<1>(_mm512_castsi256_si512(lo), hi)
    }

    #[target_feature(enable = "avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512vnni")]
    #[inline]
    unsafe fn join_f(lo: __m256, hi: __m256) -> __m512 {
        _mm512_castpd_ps(_mm512_insertf64x4::<1>(_mm512_castpd256_pd512(_mm256_castps_pd(lo)), _mm256_castps_pd(hi)))
    }

    /// The low (h = 0) or high half of `v`.
    #[target_feature(enable = "avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512vnni")]
    #[inline]
    unsafe fn half(v: __m512, h: usize) -> __m256 {
        if h == 0 {
            _mm512_castps512_ps256(v)
        } else {
            _mm256_castpd_ps(_mm512_extractf64x4_pd::<1>(_mm512_castps_pd(v)))
        }
    }

    /// Lane sums of |w| (`mag`) times x signed by w (w < 0 where `neg`): exact i32, as f32.
    #[target_feature(enable = "avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512vnni")]
    #[inline]
    unsafe fn lanes(mag: __m512i, neg: __mmask64, x: __m512i, nonneg: bool) -> __m512 {
        let sx = if nonneg { x } else { _mm512_mask_sub_epi8(x, neg, _mm512_setzero_si512(), x) };
        _mm512_cvtepi32_ps(_mm512_dpbusd_epi32(_mm512_setzero_si512(), mag, sx))
    }

    macro_rules! avx512_tile {
        ($name:ident, $F:ty, $decode:path, $nonneg:literal) => {
            #[target_feature(enable = "avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512vnni")]
            unsafe fn $name<const R: usize, const B: usize>(w: *const u8, row_bytes: usize, groups: usize, acts: *const ActGroup, out: *mut f32, ldo: usize) {
                let per_block = <$F>::WEIGHTS / GROUP;
                // acc[r][p]: batch rows 2p, 2p + 1 of weight row r (B > 1); acc[p][0]: weight
                // rows 2p, 2p + 1 (B = 1).
                let mut acc = [[_mm512_setzero_ps(); 2]; R];
                let mut acc_min = [[0f32; B]; R];
                for g in 0..groups {
                    let offset = g / per_block * <$F>::BYTES;
                    for r in 0..R {
                        // The next tile's rows at this offset (see the 256-bit tiles).
                        _mm_prefetch::<_MM_HINT_T0>(w.add((r + R) * row_bytes + offset) as *const i8);
                    }
                    if B == 1 {
                        let a = acts.add(g);
                        let xq = _mm256_loadu_si256((*a).q.as_ptr() as *const __m256i);
                        let x = join_i(xq, xq);
                        let d = _mm512_set1_ps((*a).d);
                        for p in 0..R.div_ceil(2) {
                            let (r0, r1) = (2 * p, (2 * p + 1).min(R - 1));
                            let (q0, s0, m0) = $decode(w.add(r0 * row_bytes + offset), g % per_block);
                            let (q1, s1, m1) = $decode(w.add(r1 * row_bytes + offset), g % per_block);
                            let q = join_i(q0, q1);
                            let mag = if $nonneg { q } else { _mm512_abs_epi8(q) };
                            let l = lanes(mag, _mm512_movepi8_mask(q), x, $nonneg);
                            acc[p][0] = _mm512_fmadd_ps(_mm512_mul_ps(join_f(s0, s1), d), l, acc[p][0]);
                            if <$F>::HAS_MIN {
                                acc_min[r0][0] = (m0 * (*a).d).mul_add((*a).sum as f32, acc_min[r0][0]);
                                if r1 != r0 {
                                    acc_min[r1][0] = (m1 * (*a).d).mul_add((*a).sum as f32, acc_min[r1][0]);
                                }
                            }
                        }
                    } else {
                        let mut mag = [_mm512_setzero_si512(); R];
                        let mut neg = [0 as __mmask64; R];
                        let mut scale = [_mm512_setzero_ps(); R];
                        let mut min = [0f32; R];
                        for r in 0..R {
                            let (q, s, m) = $decode(w.add(r * row_bytes + offset), g % per_block);
                            let q = join_i(q, q);
                            mag[r] = if $nonneg { q } else { _mm512_abs_epi8(q) };
                            neg[r] = _mm512_movepi8_mask(q);
                            scale[r] = join_f(s, s);
                            min[r] = m;
                        }
                        for p in 0..B.div_ceil(2) {
                            let (a0, a1) = (acts.add(2 * p * groups + g), acts.add((2 * p + 1).min(B - 1) * groups + g));
                            let x = join_i(_mm256_loadu_si256((*a0).q.as_ptr() as *const __m256i), _mm256_loadu_si256((*a1).q.as_ptr() as *const __m256i));
                            let d = join_f(_mm256_set1_ps((*a0).d), _mm256_set1_ps((*a1).d));
                            for r in 0..R {
                                let l = lanes(mag[r], neg[r], x, $nonneg);
                                acc[r][p] = _mm512_fmadd_ps(_mm512_mul_ps(scale[r], d), l, acc[r][p]);
                            }
                        }
                        if <$F>::HAS_MIN {
                            for b in 0..B {
                                let a = acts.add(b * groups + g);
                                for r in 0..R {
                                    acc_min[r][b] = (min[r] * (*a).d).mul_add((*a).sum as f32, acc_min[r][b]);
                                }
                            }
                        }
                    }
                }
                for r in 0..R {
                    for b in 0..B {
                        let v = if B == 1 { half(acc[r / 2][0], r % 2) } else { half(acc[r][b / 2], b % 2) };
                        *out.add(b * ldo + r) = hsum(v) - acc_min[r][b];
                    }
                }
            }
        };
    }

    avx512_tile!(tile_q8_0, q8_0::Q8_0, q8_0::avx2::group, false);
    avx512_tile!(tile_q4_0, q4_0::Q4_0, q4_0::avx2::group, false);
    avx512_tile!(tile_q5_0, q5_0::Q5_0, q5_0::avx2::group, false);
    avx512_tile!(tile_q4_k, q4_k::Q4K, q4_k::avx2::group, true);
    avx512_tile!(tile_q6_k, q6_k::Q6K, q6_k::avx2::group, false);

    /// The tile for `format` (see `super::tile`).
    pub unsafe fn tile(format: WeightFormat, bytes: &[u8], row0: usize, cols: usize, acts: *const ActGroup, nr: usize, nb: usize, out: *mut f32, ldo: usize) {
        let row_bytes = format.row_bytes(cols);
        let w = bytes.as_ptr().add(row0 * row_bytes);
        let groups = cols / GROUP;
        match format {
            WeightFormat::Q8_0 => dispatch!(tile_q8_0, nr, nb, w, row_bytes, groups, acts, out, ldo),
            WeightFormat::Q4_0 => dispatch!(tile_q4_0, nr, nb, w, row_bytes, groups, acts, out, ldo),
            WeightFormat::Q5_0 => dispatch!(tile_q5_0, nr, nb, w, row_bytes, groups, acts, out, ldo),
            WeightFormat::Q4K => dispatch!(tile_q4_k, nr, nb, w, row_bytes, groups, acts, out, ldo),
            WeightFormat::Q6K => dispatch!(tile_q6_k, nr, nb, w, row_bytes, groups, acts, out, ldo),
            other => unreachable!("{} is not a block format", other.name()),
        }
    }
}
