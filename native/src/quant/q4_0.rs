//! Q4_0: blocks of 32 weights, an f16 scale d then 16 bytes of 4-bit q (18 bytes); weight j
//! is the low nibble of byte j (j < 16) or the high nibble of byte j - 16; w = d * (q - 8).

use super::{f16_at, signed_scale, BlockFormat, Group, GROUP};
use half::f16;

pub struct Q4_0;

impl BlockFormat for Q4_0 {
    const WEIGHTS: usize = 32;
    const BYTES: usize = 18;
    const HAS_MIN: bool = false;

    /// ggml's reference: d = (the value of largest magnitude) / -8, q = min(15, trunc(v / d + 8.5)).
    fn quantize(values: &[f32], out: &mut Vec<u8>) {
        for x in values.chunks_exact(32) {
            let (d, id) = signed_scale(x, 8.0);
            out.extend_from_slice(&f16::from_f32(d).to_le_bytes());
            for j in 0..16 {
                let lo = ((x[j] * id + 8.5) as i8).min(15) as u8;
                let hi = ((x[16 + j] * id + 8.5) as i8).min(15) as u8;
                out.push(lo | (hi << 4));
            }
        }
    }

    #[inline]
    fn group(block: &[u8], _g: usize) -> Group {
        let d = f16_at(block, 0);
        let mut q = [0i8; GROUP];
        for j in 0..16 {
            let b = block[2 + j];
            q[j] = (b & 0xf) as i8 - 8;
            q[j + 16] = (b >> 4) as i8 - 8;
        }
        Group { q, scale: [d, d], min: 0.0 }
    }
}

#[cfg(target_arch = "x86_64")]
pub mod avx2 {
    use std::arch::x86_64::*;

    use super::super::avx2_util::{f16_scale, nibbles};

    #[target_feature(enable = "avx2,fma,f16c")]
    #[inline]
    pub unsafe fn group(block: *const u8, _g: usize) -> (__m256i, __m256, f32) {
        let q = _mm256_sub_epi8(nibbles(_mm_loadu_si128(block.add(2) as *const __m128i)), _mm256_set1_epi8(8));
        (q, _mm256_set1_ps(f16_scale(block)), 0.0)
    }
}
