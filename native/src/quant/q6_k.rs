//! Q6_K: super-blocks of 256 weights (210 bytes): 128 bytes of low 4 bits (ql), 64 bytes of
//! high 2 bits (qh), 16 int8 sub-block scales, then an f16 d. Sub-block i (16 weights) has
//! w = d * scale_i * (q - 32). Weight 128 n + 32 k + l (k < 4, l < 32) takes the low (k < 2)
//! or high nibble of ql[64 n + 32 (k % 2) + l], bits 2k.. of qh[32 n + l], and scale
//! 8 n + 2 k + l / 16.

use half::f16;

use super::{f16_at, nearest_int, signed_absmax, BlockFormat, Group, GROUP};

pub struct Q6K;

const QH: usize = 128;
const SCALES: usize = 192;
const D: usize = 208;

/// ggml's `make_qx_quants` (rmse_type 1) for n weights: the scale minimizing the x^2-weighted
/// squared error among 19 candidates; `levels` receives q + nmax in 0..2 nmax.
fn fit_scale(x: &[f32], nmax: i32, levels: &mut [i8]) -> f32 {
    let (max, amax) = signed_absmax(x);
    if amax < 1e-15 {
        levels.iter_mut().for_each(|l| *l = 0);
        return 0.0;
    }
    let quant = |iscale: f32, levels: Option<&mut [i8]>| {
        let (mut sumlx, mut suml2) = (0f32, 0f32);
        let mut out = levels;
        for (i, &v) in x.iter().enumerate() {
            let l = nearest_int(iscale * v).clamp(-nmax, nmax - 1);
            if let Some(o) = out.as_deref_mut() {
                o[i] = (l + nmax) as i8;
            }
            let w = v * v;
            sumlx += w * v * l as f32;
            suml2 += w * (l * l) as f32;
        }
        (sumlx, suml2)
    };
    let (sumlx, suml2) = quant(-(nmax as f32) / max, Some(levels));
    let mut scale = if suml2 != 0.0 { sumlx / suml2 } else { 0.0 };
    let mut best = scale * sumlx;
    for is in -9..=9 {
        if is == 0 {
            continue;
        }
        let iscale = -(nmax as f32 + 0.1 * is as f32) / max;
        let (sumlx, suml2) = quant(iscale, None);
        if suml2 > 0.0 && sumlx * sumlx > best * suml2 {
            quant(iscale, Some(levels));
            scale = sumlx / suml2;
            best = scale * sumlx;
        }
    }
    scale
}

impl BlockFormat for Q6K {
    const WEIGHTS: usize = 256;
    const BYTES: usize = 210;
    const HAS_MIN: bool = false;

    /// ggml's `quantize_row_q6_K_ref` (no importance matrix).
    fn quantize(values: &[f32], out: &mut Vec<u8>) {
        for x in values.chunks_exact(256) {
            let mut levels = [0i8; 256];
            let mut scales = [0f32; 16];
            let (mut max_scale, mut max_abs) = (0f32, 0f32);
            for i in 0..16 {
                scales[i] = fit_scale(&x[16 * i..16 * i + 16], 32, &mut levels[16 * i..16 * i + 16]);
                if scales[i].abs() > max_abs {
                    max_abs = scales[i].abs();
                    max_scale = scales[i];
                }
            }
            let mut block = [0u8; 210];
            if max_abs < 1e-15 {
                out.extend_from_slice(&block);
                continue;
            }
            let iscale = -128.0 / max_scale;
            let d = f16::from_f32(1.0 / iscale);
            for i in 0..16 {
                block[SCALES + i] = nearest_int(iscale * scales[i]).min(127) as i8 as u8;
            }
            for i in 0..16 {
                let di = d.to_f32() * block[SCALES + i] as i8 as f32;
                if di == 0.0 {
                    continue;
                }
                for k in 0..16 {
                    levels[16 * i + k] = (nearest_int(x[16 * i + k] / di).clamp(-32, 31) + 32) as i8;
                }
            }
            for n in 0..2 {
                let (j, ql, qh) = (128 * n, 64 * n, QH + 32 * n);
                for l in 0..32 {
                    let q = |k: usize| levels[j + l + 32 * k] as u8;
                    block[ql + l] = (q(0) & 0xf) | ((q(2) & 0xf) << 4);
                    block[ql + l + 32] = (q(1) & 0xf) | ((q(3) & 0xf) << 4);
                    block[qh + l] = (q(0) >> 4) | ((q(1) >> 4) << 2) | ((q(2) >> 4) << 4) | ((q(3) >> 4) << 6);
                }
            }
            block[D..D + 2].copy_from_slice(&d.to_le_bytes());
            out.extend_from_slice(&block);
        }
    }

    #[inline]
    fn group(block: &[u8], g: usize) -> Group {
        let d = f16_at(block, D);
        let (n, k) = (g / 4, g % 4);
        let ql = &block[64 * n + 32 * (k % 2)..][..32];
        let qh = &block[QH + 32 * n..][..32];
        let shift = 4 * (k / 2);
        let mut q = [0i8; GROUP];
        for l in 0..32 {
            q[l] = (((ql[l] >> shift) & 0xf) | (((qh[l] >> (2 * k)) & 3) << 4)) as i8 - 32;
        }
        let sc = |h: usize| d * block[SCALES + 8 * n + 2 * k + h] as i8 as f32;
        Group { q, scale: [sc(0), sc(1)], min: 0.0 }
    }
}

#[cfg(target_arch = "x86_64")]
pub mod avx2 {
    use std::arch::x86_64::*;

    use super::super::avx2_util::f16_scale;
    use super::{D, QH, SCALES};

    #[target_feature(enable = "avx2,fma,f16c")]
    #[inline]
    pub unsafe fn group(block: *const u8, g: usize) -> (__m256i, __m256, f32) {
        let d = f16_scale(block.add(D));
        let (n, k) = (g / 4, g % 4);
        let ql = _mm256_loadu_si256(block.add(64 * n + 32 * (k % 2)) as *const __m256i);
        let qh = _mm256_loadu_si256(block.add(QH + 32 * n) as *const __m256i);
        let low = _mm256_and_si256(if k >= 2 { _mm256_srli_epi16::<4>(ql) } else { ql }, _mm256_set1_epi8(0xf));
        let high = _mm256_and_si256(_mm256_srl_epi16(qh, _mm_cvtsi32_si128(2 * k as i32)), _mm256_set1_epi8(3));
        let q = _mm256_sub_epi8(_mm256_or_si256(low, _mm256_slli_epi16::<4>(high)), _mm256_set1_epi8(32));
        let s = block.add(SCALES + 8 * n + 2 * k);
        let (s0, s1) = (d * *s as i8 as f32, d * *s.add(1) as i8 as f32);
        (q, _mm256_set_m128(_mm_set1_ps(s1), _mm_set1_ps(s0)), 0.0)
    }
}
