//! x86-64 kernels: AVX2 + FMA + F16C, chosen at run time when the processor has them.

use std::arch::x86_64::*;
use std::sync::OnceLock;

use half::{bf16, f16};

use super::portable::WeightElem;
use crate::backend::cpu::weights::WeightView;

pub fn available() -> bool {
    static AVAILABLE: OnceLock<bool> = OnceLock::new();
    *AVAILABLE.get_or_init(|| is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma") && is_x86_feature_detected!("f16c"))
}

#[target_feature(enable = "avx2,fma,f16c")]
#[inline]
unsafe fn load_f32(p: *const f32) -> __m256 {
    _mm256_loadu_ps(p)
}

#[target_feature(enable = "avx2,fma,f16c")]
#[inline]
unsafe fn load_f16(p: *const f16) -> __m256 {
    _mm256_cvtph_ps(_mm_loadu_si128(p as *const __m128i))
}

#[target_feature(enable = "avx2,fma,f16c")]
#[inline]
unsafe fn load_bf16(p: *const bf16) -> __m256 {
    // bf16 is the top half of an f32: widen to 32 bits and shift into place.
    let wide = _mm256_cvtepu16_epi32(_mm_loadu_si128(p as *const __m128i));
    _mm256_castsi256_ps(_mm256_slli_epi32::<16>(wide))
}

/// Fixed-order horizontal sum: (lo + hi) lanes, then pairs, then the last two.
#[target_feature(enable = "avx2,fma,f16c")]
#[inline]
pub(super) unsafe fn hsum(v: __m256) -> f32 {
    let quad = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps::<1>(v));
    let pair = _mm_add_ps(quad, _mm_movehl_ps(quad, quad));
    let one = _mm_add_ss(pair, _mm_shuffle_ps::<1>(pair, pair));
    _mm_cvtss_f32(one)
}

macro_rules! tile_kernel {
    ($name:ident, $t:ty, $load:ident) => {
        /// out[b * ldo + r] = W[row0 + r] . x[b] for r < R, b < B.
        #[target_feature(enable = "avx2,fma,f16c")]
        unsafe fn $name<const R: usize, const B: usize>(w: *const $t, cols: usize, x: *const f32, out: *mut f32, ldo: usize) {
            let mut acc = [[_mm256_setzero_ps(); B]; R];
            let n8 = cols / 8 * 8;
            let mut k = 0;
            while k < n8 {
                let mut wv = [_mm256_setzero_ps(); R];
                for r in 0..R {
                    wv[r] = $load(w.add(r * cols + k));
                }
                for b in 0..B {
                    let xv = _mm256_loadu_ps(x.add(b * cols + k));
                    for r in 0..R {
                        acc[r][b] = _mm256_fmadd_ps(wv[r], xv, acc[r][b]);
                    }
                }
                k += 8;
            }
            for r in 0..R {
                for b in 0..B {
                    let mut s = hsum(acc[r][b]);
                    for kk in n8..cols {
                        s += (*w.add(r * cols + kk)).widen() * *x.add(b * cols + kk);
                    }
                    *out.add(b * ldo + r) = s;
                }
            }
        }
    };
}

tile_kernel!(tile_f32, f32, load_f32);
tile_kernel!(tile_f16, f16, load_f16);
tile_kernel!(tile_bf16, bf16, load_bf16);

/// One register tile: weight rows row0..row0+nr against x rows (nb of them, stride cols).
pub unsafe fn tile(w: WeightView<'_>, row0: usize, cols: usize, x: *const f32, nr: usize, nb: usize, out: *mut f32, ldo: usize) {
    match w {
        WeightView::F32(d) => dispatch!(tile_f32, nr, nb, d.as_ptr().add(row0 * cols), cols, x, out, ldo),
        WeightView::F16(d) => dispatch!(tile_f16, nr, nb, d.as_ptr().add(row0 * cols), cols, x, out, ldo),
        WeightView::Bf16(d) => dispatch!(tile_bf16, nr, nb, d.as_ptr().add(row0 * cols), cols, x, out, ldo),
        WeightView::Blocks(..) => unreachable!("block formats take the int8 kernels"),
    }
}
