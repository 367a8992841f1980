//! Plain-Rust kernels for processors without the x86 SIMD path (Apple Silicon, other Arm,
//! older x86). Same tiling and reduction order as the SIMD kernels: eight f32 lanes per
//! accumulator over k in steps of 8, a fixed pairwise lane sum, then the tail in order; the
//! compiler turns the lane loops into NEON or SSE instructions.

use half::{bf16, f16};

use crate::backend::cpu::weights::WeightView;

/// A stored weight element, widened to f32.
pub trait WeightElem: Copy {
    fn widen(self) -> f32;
}

impl WeightElem for f32 {
    #[inline(always)]
    fn widen(self) -> f32 {
        self
    }
}

impl WeightElem for f16 {
    #[inline(always)]
    fn widen(self) -> f32 {
        f16_bits_to_f32(self.to_bits())
    }
}

impl WeightElem for bf16 {
    #[inline(always)]
    fn widen(self) -> f32 {
        // bf16 is the top half of an f32.
        f32::from_bits((self.to_bits() as u32) << 16)
    }
}

/// Exact f16 -> f32 in integer and float arithmetic, without a per-call feature check, so
/// that the lane loops vectorize on any target.
#[inline(always)]
pub fn f16_bits_to_f32(h: u16) -> f32 {
    const EXP_MASK: u32 = 0x7c00 << 13; // the f16 exponent, moved to f32's position
    let h = h as u32;
    let sign = (h & 0x8000) << 16;
    let em = (h & 0x7fff) << 13;
    let rebias = em + ((127 - 15) << 23);
    let bits = match em & EXP_MASK {
        EXP_MASK => rebias + ((128 - 16) << 23), // inf and nan keep an all-ones exponent
        // zero and subnormals: 2^-14 * (1 + m/1024) - 2^-14, exact in f32
        0 => (f32::from_bits(rebias + (1 << 23)) - f32::from_bits(113 << 23)).to_bits(),
        _ => rebias,
    };
    f32::from_bits(bits | sign)
}

/// a * b + c. Fused where the target always has FMA (every aarch64 processor), so that Macs
/// compute the same values as the AVX2+FMA kernels; multiply-then-add elsewhere (a software
/// fused multiply-add would be far slower).
#[inline(always)]
pub(super) fn lane_fma(a: f32, b: f32, c: f32) -> f32 {
    #[cfg(target_arch = "aarch64")]
    return a.mul_add(b, c);
    #[cfg(not(target_arch = "aarch64"))]
    return a * b + c;
}

/// The fixed horizontal sum of 8 lanes (the order the AVX2 kernels use too).
#[inline(always)]
pub(super) fn lane_sum(lanes: &[f32; 8]) -> f32 {
    let quad = [lanes[0] + lanes[4], lanes[1] + lanes[5], lanes[2] + lanes[6], lanes[3] + lanes[7]];
    (quad[0] + quad[2]) + (quad[1] + quad[3])
}

/// out[b * ldo + r] = W[r] . x[b] for r < R, b < B; `w` starts at the tile's first row,
/// `x` at its first batch row, both with row stride `cols`.
unsafe fn tile_kernel<T: WeightElem, const R: usize, const B: usize>(w: *const T, cols: usize, x: *const f32, out: *mut f32, ldo: usize) {
    let n8 = cols / 8 * 8;
    let mut acc = [[[0f32; 8]; B]; R];
    let mut wv = [[0f32; 8]; R];
    let mut k = 0;
    while k < n8 {
        for r in 0..R {
            let row = std::slice::from_raw_parts(w.add(r * cols + k), 8);
            for l in 0..8 {
                wv[r][l] = row[l].widen();
            }
        }
        for b in 0..B {
            let xr = std::slice::from_raw_parts(x.add(b * cols + k), 8);
            for r in 0..R {
                for l in 0..8 {
                    acc[r][b][l] = lane_fma(wv[r][l], xr[l], acc[r][b][l]);
                }
            }
        }
        k += 8;
    }
    for r in 0..R {
        for b in 0..B {
            let mut s = lane_sum(&acc[r][b]);
            for kk in n8..cols {
                s += (*w.add(r * cols + kk)).widen() * *x.add(b * cols + kk);
            }
            *out.add(b * ldo + r) = s;
        }
    }
}

/// One register tile: weight rows row0..row0+nr against nb x rows (stride cols).
pub unsafe fn tile(w: WeightView<'_>, row0: usize, cols: usize, x: *const f32, nr: usize, nb: usize, out: *mut f32, ldo: usize) {
    match w {
        WeightView::F32(d) => dispatch!(f32_tile, nr, nb, d.as_ptr().add(row0 * cols), cols, x, out, ldo),
        WeightView::F16(d) => dispatch!(f16_tile, nr, nb, d.as_ptr().add(row0 * cols), cols, x, out, ldo),
        WeightView::Bf16(d) => dispatch!(bf16_tile, nr, nb, d.as_ptr().add(row0 * cols), cols, x, out, ldo),
        WeightView::Blocks(..) => unreachable!("block formats take the int8 kernels"),
    }
}

unsafe fn f32_tile<const R: usize, const B: usize>(w: *const f32, cols: usize, x: *const f32, out: *mut f32, ldo: usize) {
    tile_kernel::<f32, R, B>(w, cols, x, out, ldo)
}

unsafe fn f16_tile<const R: usize, const B: usize>(w: *const f16, cols: usize, x: *const f32, out: *mut f32, ldo: usize) {
    tile_kernel::<f16, R, B>(w, cols, x, out, ldo)
}

unsafe fn bf16_tile<const R: usize, const B: usize>(w: *const bf16, cols: usize, x: *const f32, out: *mut f32, ldo: usize) {
    tile_kernel::<bf16, R, B>(w, cols, x, out, ldo)
}

#[cfg(test)]
mod tests {
    use half::{bf16, f16};

    use super::*;

    #[test]
    fn f16_widening_is_exact_for_every_value() {
        for bits in 0..=u16::MAX {
            let want = f16::from_bits(bits).to_f32();
            let got = f16_bits_to_f32(bits);
            assert!(got.to_bits() == want.to_bits() || (got.is_nan() && want.is_nan()), "{bits:#06x}: {got} vs {want}");
        }
    }

    #[test]
    fn bf16_widening_is_exact_for_every_value() {
        for bits in 0..=u16::MAX {
            let want = bf16::from_bits(bits).to_f32();
            let got = bf16::from_bits(bits).widen();
            assert!(got.to_bits() == want.to_bits() || (got.is_nan() && want.is_nan()), "{bits:#06x}");
        }
    }
}
