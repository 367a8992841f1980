//! Q4_K: super-blocks of 256 weights (144 bytes): an f16 scale d, an f16 dmin, 12 bytes of
//! eight 6-bit sub-block scales and mins, then 128 bytes of 4-bit q. Sub-block g (32 weights)
//! has w = d * sc_g * q - dmin * m_g; its q are the low nibbles (g even) or high nibbles (g
//! odd) of bytes 32 * (g / 2) .. + 32.

use half::f16;

use super::{f16_at, nearest_int, BlockFormat, Group, GROUP};

pub struct Q4K;

const SCALES: usize = 4;
const QS: usize = 16;

/// ggml's `get_scale_min_k4`: the 6-bit scale and min of sub-block `j` from the 12 bytes.
#[inline]
pub fn scale_min(j: usize, s: &[u8]) -> (u8, u8) {
    if j < 4 {
        (s[j] & 63, s[j + 4] & 63)
    } else {
        ((s[j + 4] & 0xf) | ((s[j - 4] >> 6) << 4), (s[j + 4] >> 4) | ((s[j] >> 6) << 4))
    }
}

/// ggml's `make_qkx2_quants` for n weights with importance `weights`: the scale and min
/// (returned as a positive offset) minimizing the weighted squared error, searched over
/// nstep + 1 candidate scales; `levels` receives the quantized values 0..=nmax.
fn fit_scale_min(x: &[f32], weights: &[f32], nmax: i32, levels: &mut [u8]) -> (f32, f32) {
    let (rmin, rdelta, nstep) = (-1.0f32, 0.1f32, 20);
    let n = x.len();
    let mut min = x[0];
    let mut max = x[0];
    let mut sum_w = weights[0];
    let mut sum_x = sum_w * x[0];
    for i in 1..n {
        min = min.min(x[i]);
        max = max.max(x[i]);
        sum_w += weights[i];
        sum_x += weights[i] * x[i];
    }
    if min > 0.0 {
        min = 0.0;
    }
    if max == min {
        levels.iter_mut().for_each(|l| *l = 0);
        return (0.0, -min);
    }
    let mut iscale = nmax as f32 / (max - min);
    let mut scale = 1.0 / iscale;
    let mut best = 0f32;
    for i in 0..n {
        let l = nearest_int(iscale * (x[i] - min)).clamp(0, nmax);
        levels[i] = l as u8;
        let diff = scale * l as f32 + min - x[i];
        best += weights[i] * diff * diff;
    }
    let mut aux = [0u8; 32];
    for is in 0..=nstep {
        iscale = (rmin + rdelta * is as f32 + nmax as f32) / (max - min);
        let (mut sum_l, mut sum_l2, mut sum_xl) = (0f32, 0f32, 0f32);
        for i in 0..n {
            let l = nearest_int(iscale * (x[i] - min)).clamp(0, nmax);
            aux[i] = l as u8;
            let (w, l) = (weights[i], l as f32);
            sum_l += w * l;
            sum_l2 += w * l * l;
            sum_xl += w * l * x[i];
        }
        let det = sum_w * sum_l2 - sum_l * sum_l;
        if det > 0.0 {
            let mut this_scale = (sum_w * sum_xl - sum_x * sum_l) / det;
            let mut this_min = (sum_l2 * sum_x - sum_l * sum_xl) / det;
            if this_min > 0.0 {
                this_min = 0.0;
                this_scale = sum_xl / sum_l2;
            }
            let mut err = 0f32;
            for i in 0..n {
                let diff = this_scale * aux[i] as f32 + this_min - x[i];
                err += weights[i] * diff * diff;
            }
            if err < best {
                levels[..n].copy_from_slice(&aux[..n]);
                best = err;
                scale = this_scale;
                min = this_min;
            }
        }
    }
    (scale, -min)
}

impl BlockFormat for Q4K {
    const WEIGHTS: usize = 256;
    const BYTES: usize = 144;
    const HAS_MIN: bool = true;

    /// ggml's `quantize_row_q4_K_ref` (no importance matrix).
    fn quantize(values: &[f32], out: &mut Vec<u8>) {
        for x in values.chunks_exact(256) {
            let mut levels = [0u8; 256];
            let (mut scales, mut mins) = ([0f32; 8], [0f32; 8]);
            for j in 0..8 {
                let sub = &x[32 * j..32 * j + 32];
                let av = (sub.iter().map(|v| v * v).sum::<f32>() / 32.0).sqrt();
                let weights: [f32; 32] = std::array::from_fn(|i| av + sub[i].abs());
                (scales[j], mins[j]) = fit_scale_min(sub, &weights, 15, &mut levels[32 * j..32 * j + 32]);
            }
            let max_scale = scales.iter().fold(0f32, |m, &s| if s > m { s } else { m });
            let max_min = mins.iter().fold(0f32, |m, &s| if s > m { s } else { m });
            let inv_scale = if max_scale > 0.0 { 63.0 / max_scale } else { 0.0 };
            let inv_min = if max_min > 0.0 { 63.0 / max_min } else { 0.0 };
            let mut packed = [0u8; 12];
            for j in 0..8 {
                let ls = (nearest_int(inv_scale * scales[j]) as u8).min(63);
                let lm = (nearest_int(inv_min * mins[j]) as u8).min(63);
                if j < 4 {
                    packed[j] = ls;
                    packed[j + 4] = lm;
                } else {
                    packed[j + 4] = (ls & 0xf) | ((lm & 0xf) << 4);
                    packed[j - 4] |= (ls >> 4) << 6;
                    packed[j] |= (lm >> 4) << 6;
                }
            }
            let d = f16::from_f32(max_scale / 63.0);
            let dmin = f16::from_f32(max_min / 63.0);
            for j in 0..8 {
                let (sc, m) = scale_min(j, &packed);
                let dj = d.to_f32() * sc as f32;
                if dj == 0.0 {
                    continue;
                }
                let dm = dmin.to_f32() * m as f32;
                for i in 0..32 {
                    levels[32 * j + i] = nearest_int((x[32 * j + i] + dm) / dj).clamp(0, 15) as u8;
                }
            }
            out.extend_from_slice(&d.to_le_bytes());
            out.extend_from_slice(&dmin.to_le_bytes());
            out.extend_from_slice(&packed);
            for j in (0..256).step_by(64) {
                out.extend((0..32).map(|l| levels[j + l] | (levels[j + l + 32] << 4)));
            }
        }
    }

    #[inline]
    fn group(block: &[u8], g: usize) -> Group {
        let (sc, m) = scale_min(g, &block[SCALES..SCALES + 12]);
        let scale = f16_at(block, 0) * sc as f32;
        let min = f16_at(block, 2) * m as f32;
        let bytes = &block[QS + 32 * (g / 2)..QS + 32 * (g / 2) + 32];
        let shift = 4 * (g % 2);
        let mut q = [0i8; GROUP];
        for (v, b) in q.iter_mut().zip(bytes) {
            *v = ((b >> shift) & 0xf) as i8;
        }
        Group { q, scale: [scale, scale], min }
    }
}

#[cfg(target_arch = "x86_64")]
pub mod avx2 {
    use std::arch::x86_64::*;

    use super::super::avx2_util::f16_scale;
    use super::{scale_min, QS, SCALES};

    #[target_feature(enable = "avx2,fma,f16c")]
    #[inline]
    pub unsafe fn group(block: *const u8, g: usize) -> (__m256i, __m256, f32) {
        let (sc, m) = scale_min(g, std::slice::from_raw_parts(block.add(SCALES), 12));
        let scale = f16_scale(block) * sc as f32;
        let min = f16_scale(block.add(2)) * m as f32;
        let bytes = _mm256_loadu_si256(block.add(QS + 32 * (g / 2)) as *const __m256i);
        let q = if g % 2 == 0 { bytes } else { _mm256_srli_epi16::<4>(bytes) };
        (_mm256_and_si256(q, _mm256_set1_epi8(0xf)), _mm256_set1_ps(scale), min)
    }
}
