//! Shared AVX2 pieces of the formats' group decoders.

use std::arch::x86_64::*;

/// The 16 bytes of `packed` split into 32 nibbles: the low nibbles in bytes 0..16, the high
/// ones in bytes 16..32.
#[target_feature(enable = "avx2,fma,f16c")]
#[inline]
pub unsafe fn nibbles(packed: __m128i) -> __m256i {
    let both = _mm256_set_m128i(_mm_srli_epi16::<4>(packed), packed);
    _mm256_and_si256(both, _mm256_set1_epi8(0xf))
}

/// Byte j is 0xff where bit j of `bits` is set, 0 elsewhere.
#[target_feature(enable = "avx2,fma,f16c")]
#[inline]
pub unsafe fn bits_to_bytes(bits: u32) -> __m256i {
    let spread = _mm256_set_epi64x(0x0303030303030303, 0x0202020202020202, 0x0101010101010101, 0);
    let bytes = _mm256_shuffle_epi8(_mm256_set1_epi32(bits as i32), spread);
    let bit = _mm256_set1_epi64x(0x8040201008040201u64 as i64);
    _mm256_cmpeq_epi8(_mm256_and_si256(bytes, bit), bit)
}

/// The f16 at the start of `p`, as f32.
#[target_feature(enable = "avx2,fma,f16c")]
#[inline]
pub unsafe fn f16_scale(p: *const u8) -> f32 {
    _mm_cvtss_f32(_mm_cvtph_ps(_mm_cvtsi32_si128(u16::from_le_bytes([*p, *p.add(1)]) as i32)))
}
