//! Q8_0: blocks of 32 weights, each an f16 scale d then 32 int8 q (34 bytes); w = d * q.

use super::{f16_at, BlockFormat, Group, GROUP};
use half::f16;

pub struct Q8_0;

impl BlockFormat for Q8_0 {
    const WEIGHTS: usize = 32;
    const BYTES: usize = 34;
    const HAS_MIN: bool = false;

    /// ggml's reference: d = max|v| / 127 rounded to f16, q = round(v / d) (halves away from
    /// zero).
    fn quantize(values: &[f32], out: &mut Vec<u8>) {
        for block in values.chunks_exact(32) {
            let amax = block.iter().fold(0f32, |m, v| m.max(v.abs()));
            let d = amax / 127.0;
            let id = if d != 0.0 { 1.0 / d } else { 0.0 };
            out.extend_from_slice(&f16::from_f32(d).to_le_bytes());
            out.extend(block.iter().map(|&v| (v * id).round() as i8 as u8));
        }
    }

    #[inline]
    fn group(block: &[u8], _g: usize) -> Group {
        let d = f16_at(block, 0);
        let mut q = [0i8; GROUP];
        for (j, v) in q.iter_mut().enumerate() {
            *v = block[2 + j] as i8;
        }
        Group { q, scale: [d, d], min: 0.0 }
    }
}

#[cfg(target_arch = "x86_64")]
pub mod avx2 {
    use std::arch::x86_64::*;

    /// The group's 32 q and its scale (both halves).
    #[target_feature(enable = "avx2,fma,f16c")]
    #[inline]
    pub unsafe fn group(block: *const u8, _g: usize) -> (__m256i, __m256, f32) {
        let d = _mm_cvtss_f32(_mm_cvtph_ps(_mm_cvtsi32_si128(u16::from_le_bytes([*block, *block.add(1)]) as i32)));
        (_mm256_loadu_si256(block.add(2) as *const __m256i), _mm256_set1_ps(d), 0.0)
    }
}
