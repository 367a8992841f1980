//! Q5_0: blocks of 32 weights, an f16 scale d, 4 bytes of fifth bits (bit j of the
//! little-endian u32 for weight j) and 16 bytes of low nibbles as in Q4_0 (22 bytes);
//! w = d * (q - 16).

use super::{f16_at, signed_scale, BlockFormat, Group, GROUP};
use half::f16;

pub struct Q5_0;

impl BlockFormat for Q5_0 {
    const WEIGHTS: usize = 32;
    const BYTES: usize = 22;
    const HAS_MIN: bool = false;

    /// ggml's reference: d = (the value of largest magnitude) / -16, q = min(31, trunc(v / d + 16.5)).
    fn quantize(values: &[f32], out: &mut Vec<u8>) {
        for x in values.chunks_exact(32) {
            let (d, id) = signed_scale(x, 16.0);
            let mut qh = 0u32;
            let mut qs = [0u8; 16];
            for j in 0..16 {
                let lo = ((x[j] * id + 16.5) as i8).min(31) as u8;
                let hi = ((x[16 + j] * id + 16.5) as i8).min(31) as u8;
                qs[j] = (lo & 0xf) | ((hi & 0xf) << 4);
                qh |= ((lo as u32 & 0x10) >> 4) << j;
                qh |= ((hi as u32 & 0x10) >> 4) << (j + 16);
            }
            out.extend_from_slice(&f16::from_f32(d).to_le_bytes());
            out.extend_from_slice(&qh.to_le_bytes());
            out.extend_from_slice(&qs);
        }
    }

    #[inline]
    fn group(block: &[u8], _g: usize) -> Group {
        let d = f16_at(block, 0);
        let qh = u32::from_le_bytes([block[2], block[3], block[4], block[5]]);
        let mut q = [0i8; GROUP];
        for j in 0..16 {
            let b = block[6 + j];
            q[j] = ((b & 0xf) | (((qh >> j) & 1) << 4) as u8) as i8 - 16;
            q[j + 16] = ((b >> 4) | (((qh >> (j + 16)) & 1) << 4) as u8) as i8 - 16;
        }
        Group { q, scale: [d, d], min: 0.0 }
    }
}

#[cfg(target_arch = "x86_64")]
pub mod avx2 {
    use std::arch::x86_64::*;

    use super::super::avx2_util::{bits_to_bytes, f16_scale, nibbles};

    #[target_feature(enable = "avx2,fma,f16c")]
    #[inline]
    pub unsafe fn group(block: *const u8, _g: usize) -> (__m256i, __m256, f32) {
        let qh = u32::from_le_bytes([*block.add(2), *block.add(3), *block.add(4), *block.add(5)]);
        // The fifth bit as 0x10 where set.
        let high = _mm256_and_si256(bits_to_bytes(qh), _mm256_set1_epi8(0x10));
        let q = _mm256_or_si256(nibbles(_mm_loadu_si128(block.add(6) as *const __m128i)), high);
        (_mm256_sub_epi8(q, _mm256_set1_epi8(16)), _mm256_set1_ps(f16_scale(block)), 0.0)
    }
}
