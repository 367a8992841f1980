//! Matrix products against weight matrices: out (batch, rows) = x (batch, cols) @ W^T,
//! W (rows, cols) in f32, f16 or bf16, arithmetic in f32.
//!
//! Batch invariance: every output element is one dot product whose reduction order is fixed
//! (eight f32 lanes accumulated over k in steps of 8, a fixed horizontal sum, then the scalar
//! tail in order), whatever the batch size, the tile it falls in or the thread that runs it.
//! Threads split the output rows, never the reduction. A row of `x` therefore gets
//! bit-identical results alone or in any batch.

use rayon::prelude::*;

use crate::model::weights::WeightView;

/// Register tile for batches: 3 weight rows x 4 x rows (12 accumulators + 3 weight vectors
/// + 1 x vector fill the 16 AVX registers). Fewer weight rows per tile means fewer f16/bf16
/// conversions per FMA; on Zen 3 this shape measured ~1.5x the 4 x 3 tile at batch 32.
const TILE_ROWS: usize = 3;
const TILE_BATCH: usize = 4;
/// Register tile at batch 1 (memory-bound): 4 independent rows keep loads in flight.
const TILE_ROWS_SINGLE: usize = 4;
/// Below this many multiply-adds a product runs on the calling thread.
const PARALLEL_MIN_WORK: usize = 1 << 16;
/// Most output rows per task: small tasks even out uneven cores.
const PANEL_ROWS: usize = 72;

#[derive(Clone, Copy)]
struct OutPtr(*mut f32);
// SAFETY: tasks write disjoint row ranges of the output.
unsafe impl Send for OutPtr {}
unsafe impl Sync for OutPtr {}

/// out (batch, rows) = x (batch, cols) @ W^T with W (rows, cols). Uses the current rayon pool.
pub fn matmul(w: WeightView<'_>, rows: usize, cols: usize, x: &[f32], batch: usize, out: &mut [f32]) {
    assert_eq!(x.len(), batch * cols, "x must be (batch, cols)");
    assert_eq!(out.len(), batch * rows, "out must be (batch, rows)");
    assert_eq!(weight_len(w), rows * cols, "W must be (rows, cols)");
    if batch == 0 || rows == 0 {
        return;
    }
    let ptr = OutPtr(out.as_mut_ptr());
    let threads = rayon::current_num_threads().max(1);
    if threads == 1 || rows * cols * batch < PARALLEL_MIN_WORK {
        // SAFETY: the one task covers all rows of a correctly sized output.
        unsafe { row_range(w, rows, cols, x, batch, 0, rows, ptr) };
        return;
    }
    // Several chunks per thread so uneven cores even out; chunks are whole tiles.
    let chunk = rows.div_ceil(threads * 4).next_multiple_of(12).clamp(12, PANEL_ROWS);
    (0..rows.div_ceil(chunk)).into_par_iter().for_each(|c| {
        let start = c * chunk;
        let end = (start + chunk).min(rows);
        // SAFETY: chunks are disjoint row ranges within bounds.
        unsafe { row_range(w, rows, cols, x, batch, start, end, ptr) };
    });
}

fn weight_len(w: WeightView<'_>) -> usize {
    match w {
        WeightView::F32(d) => d.len(),
        WeightView::F16(d) => d.len(),
        WeightView::Bf16(d) => d.len(),
    }
}

/// Output rows `start..end` for every batch row.
unsafe fn row_range(w: WeightView<'_>, rows: usize, cols: usize, x: &[f32], batch: usize, start: usize, end: usize, out: OutPtr) {
    #[cfg(target_arch = "x86_64")]
    if avx2::available() {
        let tile_rows = if batch == 1 { TILE_ROWS_SINGLE } else { TILE_ROWS };
        let mut r = start;
        while r < end {
            let nr = (end - r).min(tile_rows);
            let mut b = 0;
            while b < batch {
                let nb = (batch - b).min(TILE_BATCH);
                avx2::tile(w, r, cols, x.as_ptr().add(b * cols), nr, nb, out.0.add(b * rows + r), rows);
                b += nb;
            }
            r += nr;
        }
        return;
    }
    for r in start..end {
        for b in 0..batch {
            *out.0.add(b * rows + r) = portable_dot(w, r * cols, &x[b * cols..(b + 1) * cols]);
        }
    }
}

/// The same reduction shape as the SIMD path, in plain Rust: eight lanes over k in steps of
/// 8, a pairwise lane sum, then the tail in order.
fn portable_dot(w: WeightView<'_>, offset: usize, x: &[f32]) -> f32 {
    let n = x.len();
    let n8 = n / 8 * 8;
    let mut lanes = [0f32; 8];
    let mut buf = [0f32; 8];
    for k in (0..n8).step_by(8) {
        w.copy_to_f32(offset + k, &mut buf);
        for l in 0..8 {
            lanes[l] += buf[l] * x[k + l];
        }
    }
    let quad = [lanes[0] + lanes[4], lanes[1] + lanes[5], lanes[2] + lanes[6], lanes[3] + lanes[7]];
    let pair = [quad[0] + quad[2], quad[1] + quad[3]];
    let mut s = pair[0] + pair[1];
    for k in n8..n {
        s += w.get(offset + k) * x[k];
    }
    s
}

/// Plain reference: out (batch, rows) in f64 accumulation, for tests and checks.
pub fn matmul_reference(w: WeightView<'_>, rows: usize, cols: usize, x: &[f32], batch: usize) -> Vec<f32> {
    let mut out = vec![0f32; batch * rows];
    for b in 0..batch {
        for r in 0..rows {
            let mut s = 0f64;
            for k in 0..cols {
                s += w.get(r * cols + k) as f64 * x[b * cols + k] as f64;
            }
            out[b * rows + r] = s as f32;
        }
    }
    out
}

#[cfg(target_arch = "x86_64")]
mod avx2 {
    use std::arch::x86_64::*;
    use std::sync::OnceLock;

    use half::{bf16, f16};

    use super::WeightView;

    pub fn available() -> bool {
        static AVAILABLE: OnceLock<bool> = OnceLock::new();
        *AVAILABLE.get_or_init(|| {
            is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma") && is_x86_feature_detected!("f16c")
        })
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
    unsafe fn hsum(v: __m256) -> f32 {
        let quad = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps::<1>(v));
        let pair = _mm_add_ps(quad, _mm_movehl_ps(quad, quad));
        let one = _mm_add_ss(pair, _mm_shuffle_ps::<1>(pair, pair));
        _mm_cvtss_f32(one)
    }

    macro_rules! tile_kernel {
        ($name:ident, $t:ty, $load:ident) => {
            /// out[b * ldo + r] = W[row0 + r] . x[b] for r < R, b < B.
            #[target_feature(enable = "avx2,fma,f16c")]
            unsafe fn $name<const R: usize, const B: usize>(
                w: *const $t,
                cols: usize,
                x: *const f32,
                out: *mut f32,
                ldo: usize,
            ) {
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
                            s += (*w.add(r * cols + kk)).to_f32_value() * *x.add(b * cols + kk);
                        }
                        *out.add(b * ldo + r) = s;
                    }
                }
            }
        };
    }

    trait ToF32 {
        fn to_f32_value(self) -> f32;
    }
    impl ToF32 for f32 {
        #[inline(always)]
        fn to_f32_value(self) -> f32 {
            self
        }
    }
    impl ToF32 for f16 {
        #[inline(always)]
        fn to_f32_value(self) -> f32 {
            self.to_f32()
        }
    }
    impl ToF32 for bf16 {
        #[inline(always)]
        fn to_f32_value(self) -> f32 {
            self.to_f32()
        }
    }

    tile_kernel!(tile_f32, f32, load_f32);
    tile_kernel!(tile_f16, f16, load_f16);
    tile_kernel!(tile_bf16, bf16, load_bf16);

    /// Calls `$kernel::<R, B>(args...)` for a run-time tile shape (R <= 4, B <= 4).
    macro_rules! dispatch {
        ($kernel:ident, $nr:expr, $nb:expr, $($arg:expr),*) => {
            match ($nr, $nb) {
                (1, 1) => $kernel::<1, 1>($($arg),*),
                (1, 2) => $kernel::<1, 2>($($arg),*),
                (1, 3) => $kernel::<1, 3>($($arg),*),
                (1, 4) => $kernel::<1, 4>($($arg),*),
                (2, 1) => $kernel::<2, 1>($($arg),*),
                (2, 2) => $kernel::<2, 2>($($arg),*),
                (2, 3) => $kernel::<2, 3>($($arg),*),
                (2, 4) => $kernel::<2, 4>($($arg),*),
                (3, 1) => $kernel::<3, 1>($($arg),*),
                (3, 2) => $kernel::<3, 2>($($arg),*),
                (3, 3) => $kernel::<3, 3>($($arg),*),
                (3, 4) => $kernel::<3, 4>($($arg),*),
                (4, 1) => $kernel::<4, 1>($($arg),*),
                (4, 2) => $kernel::<4, 2>($($arg),*),
                (4, 3) => $kernel::<4, 3>($($arg),*),
                (4, 4) => $kernel::<4, 4>($($arg),*),
                _ => unreachable!("tile {}x{} out of range", $nr, $nb),
            }
        };
    }

    /// One register tile: weight rows row0..row0+nr against x rows (nb of them, stride cols).
    pub unsafe fn tile(w: WeightView<'_>, row0: usize, cols: usize, x: *const f32, nr: usize, nb: usize, out: *mut f32, ldo: usize) {
        match w {
            WeightView::F32(d) => dispatch!(tile_f32, nr, nb, d.as_ptr().add(row0 * cols), cols, x, out, ldo),
            WeightView::F16(d) => dispatch!(tile_f16, nr, nb, d.as_ptr().add(row0 * cols), cols, x, out, ldo),
            WeightView::Bf16(d) => dispatch!(tile_bf16, nr, nb, d.as_ptr().add(row0 * cols), cols, x, out, ldo),
        }
    }
}

#[cfg(test)]
mod tests {
    use half::{bf16, f16};
    use rand::{Rng, SeedableRng};

    use super::*;

    fn random(n: usize, rng: &mut impl Rng) -> Vec<f32> {
        (0..n).map(|_| rng.gen_range(-1.0f32..1.0)).collect()
    }

    fn check_against_reference(rows: usize, cols: usize, batch: usize, seed: u64) {
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
        let w32 = random(rows * cols, &mut rng);
        let w16: Vec<f16> = w32.iter().map(|&v| f16::from_f32(v)).collect();
        let wb16: Vec<bf16> = w32.iter().map(|&v| bf16::from_f32(v)).collect();
        let x = random(batch * cols, &mut rng);
        for w in [WeightView::F32(&w32), WeightView::F16(&w16), WeightView::Bf16(&wb16)] {
            let mut out = vec![0f32; batch * rows];
            matmul(w, rows, cols, &x, batch, &mut out);
            let reference = matmul_reference(w, rows, cols, &x, batch);
            for (i, (a, b)) in out.iter().zip(&reference).enumerate() {
                let tol = 1e-5 * (cols as f32).sqrt() * 4.0;
                assert!((a - b).abs() <= tol, "({rows}x{cols}, batch {batch}) element {i}: {a} vs reference {b}");
            }
        }
    }

    #[test]
    fn matches_reference_on_random_inputs_with_ragged_shapes() {
        for (i, &(rows, cols, batch)) in
            [(1, 1, 1), (5, 7, 2), (4, 8, 3), (13, 67, 5), (64, 64, 1), (130, 259, 7), (256, 512, 33)].iter().enumerate()
        {
            check_against_reference(rows, cols, batch, 100 + i as u64);
        }
    }

    #[test]
    fn multithreaded_matches_reference() {
        let pool = rayon::ThreadPoolBuilder::new().num_threads(3).build().unwrap();
        pool.install(|| check_against_reference(301, 517, 9, 7));
    }

    #[test]
    fn each_row_is_bit_identical_alone_or_in_any_batch() {
        let (rows, cols) = (71, 203);
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(3);
        let w: Vec<f16> = random(rows * cols, &mut rng).into_iter().map(f16::from_f32).collect();
        let x = random(11 * cols, &mut rng);
        let mut batched = vec![0f32; 11 * rows];
        let pool = rayon::ThreadPoolBuilder::new().num_threads(2).build().unwrap();
        pool.install(|| matmul(WeightView::F16(&w), rows, cols, &x, 11, &mut batched));
        for b in 0..11 {
            let mut alone = vec![0f32; rows];
            matmul(WeightView::F16(&w), rows, cols, &x[b * cols..(b + 1) * cols], 1, &mut alone);
            let same = alone.iter().zip(&batched[b * rows..(b + 1) * rows]).all(|(a, c)| a.to_bits() == c.to_bits());
            assert!(same, "batch row {b} differs from the same row computed alone");
        }
    }

    #[test]
    fn portable_path_matches_reference() {
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(9);
        let (rows, cols) = (9, 45);
        let w = random(rows * cols, &mut rng);
        let x = random(cols, &mut rng);
        let reference = matmul_reference(WeightView::F32(&w), rows, cols, &x, 1);
        for r in 0..rows {
            let got = portable_dot(WeightView::F32(&w), r * cols, &x);
            assert!((got - reference[r]).abs() < 1e-5, "row {r}: {got} vs {}", reference[r]);
        }
    }
}

/// Which matrix-product path this processor runs.
pub fn simd_name() -> &'static str {
    #[cfg(target_arch = "x86_64")]
    if avx2::available() {
        return "avx2+fma+f16c";
    }
    "portable"
}
