//! Matrix products against weight matrices: out (batch, rows) = x (batch, cols) @ W^T,
//! W (rows, cols) in f32, f16 or bf16 (arithmetic in f32), or a block format (`int8`:
//! integer products against int8-quantized activations).
//!
//! Batch invariance: every output element is one dot product whose reduction order is fixed
//! (eight f32 lanes accumulated over k in steps of 8, a fixed horizontal sum, then the scalar
//! tail in order), whatever the batch size, the tile it falls in or the thread that runs it.
//! Threads split the output rows, never the reduction. A row of `x` therefore gets
//! bit-identical results alone or in any batch.

use std::sync::OnceLock;

use rayon::prelude::*;

use crate::backend::cpu::weights::WeightView;

/// Calls `$kernel::<G.., R, B>(args...)` for a run-time tile shape (R <= 4, B <= 4); `[G..]`
/// are leading generic arguments (a block format), if any.
macro_rules! dispatch {
($kernel:ident, $nr:expr, $nb:expr, $($arg:expr),*) => { dispatch!($kernel [], $nr, $nb, $($arg),*) };
($kernel:ident [$($g:ty),*], $nr:expr, $nb:expr, $($arg:expr),*) => {
    match ($nr, $nb) {
        (1, 1) => $kernel::<$($g,)* 1, 1>($($arg),*),
        (1, 2) => $kernel::<$($g,)* 1, 2>($($arg),*),
        (1, 3) => $kernel::<$($g,)* 1, 3>($($arg),*),
        (1, 4) => $kernel::<$($g,)* 1, 4>($($arg),*),
        (2, 1) => $kernel::<$($g,)* 2, 1>($($arg),*),
        (2, 2) => $kernel::<$($g,)* 2, 2>($($arg),*),
        (2, 3) => $kernel::<$($g,)* 2, 3>($($arg),*),
        (2, 4) => $kernel::<$($g,)* 2, 4>($($arg),*),
        (3, 1) => $kernel::<$($g,)* 3, 1>($($arg),*),
        (3, 2) => $kernel::<$($g,)* 3, 2>($($arg),*),
        (3, 3) => $kernel::<$($g,)* 3, 3>($($arg),*),
        (3, 4) => $kernel::<$($g,)* 3, 4>($($arg),*),
        (4, 1) => $kernel::<$($g,)* 4, 1>($($arg),*),
        (4, 2) => $kernel::<$($g,)* 4, 2>($($arg),*),
        (4, 3) => $kernel::<$($g,)* 4, 3>($($arg),*),
        (4, 4) => $kernel::<$($g,)* 4, 4>($($arg),*),
        _ => unreachable!("tile {}x{} out of range", $nr, $nb),
    }
};
}

#[cfg(target_arch = "x86_64")]
mod avx2;
mod f32acts;
mod int8;
mod portable;

/// Register tile for batches: 3 weight rows x 4 x rows (12 accumulators + 3 weight vectors
/// + 1 x vector fill the 16 AVX registers). Fewer weight rows per tile means fewer f16/bf16
/// conversions per FMA; on Zen 3 this shape measured ~1.5x the 4 x 3 tile at batch 32.
const TILE_ROWS: usize = 3;
const TILE_BATCH: usize = 4;
/// Register tile at batch 1 (memory-bound): 4 independent rows keep loads in flight.
const TILE_ROWS_SINGLE: usize = 4;
/// Portable tile: 4 x 2 accumulators of 8 lanes (16 NEON registers) + 4 weight chunks.
const PORTABLE_TILE_ROWS: usize = 4;
const PORTABLE_TILE_BATCH: usize = 2;
/// Int8 tiles (weight rows x batch rows): at batch 1, 4 rows keep loads in flight; batched,
/// 2 x 4 (8 accumulators beside 2 decoded groups, their magnitudes and scales).
const INT8_TILE_SINGLE: (usize, usize) = (4, 1);
const INT8_TILE: (usize, usize) = (2, 4);
/// 512-bit int8 tiles, batched: 4 weight rows x 2 pairs of batch rows (8 of the 32 registers;
/// 2 x 4 measured ~10% slower).
const INT8_TILE_ZMM: (usize, usize) = (4, 4);
const INT8_PORTABLE_TILE: (usize, usize) = (4, 2);
/// f32-activation tiles: each decoded weight row holds 4 vectors of 8 lanes, so 2 rows.
const F32ACTS_TILE_SINGLE: (usize, usize) = (2, 1);
const F32ACTS_TILE: (usize, usize) = (2, 4);
/// Below this many multiply-adds a product runs on the calling thread.
const PARALLEL_MIN_WORK: usize = 1 << 16;
/// Most output rows per task: small tasks even out uneven cores.
const PANEL_ROWS: usize = 72;

#[derive(Clone, Copy)]
struct OutPtr(*mut f32);
// SAFETY: tasks write disjoint row ranges of the output.
unsafe impl Send for OutPtr {}
unsafe impl Sync for OutPtr {}

/// How products with block-format weights take the activations.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum BlockActs {
    /// Quantized to int8 per group of 32, integer dot products (fast; llama.cpp does the same).
    #[default]
    Int8,
    /// Kept in f32 against the dequantized weights (follows the dequantized model closely).
    F32,
}

/// out (batch, rows) = x (batch, cols) @ W^T with W (rows, cols). Uses the current rayon pool.
pub fn matmul(w: WeightView<'_>, rows: usize, cols: usize, x: &[f32], batch: usize, out: &mut [f32]) {
    matmul_using(simd(), BlockActs::Int8, w, rows, cols, x, batch, out)
}

/// `matmul` with the activations of block-format products taken as `acts` says.
pub fn matmul_with(acts: BlockActs, w: WeightView<'_>, rows: usize, cols: usize, x: &[f32], batch: usize, out: &mut [f32]) {
    matmul_using(simd(), acts, w, rows, cols, x, batch, out)
}

#[allow(clippy::too_many_arguments)]
fn matmul_using(kernels: Simd, acts: BlockActs, w: WeightView<'_>, rows: usize, cols: usize, x: &[f32], batch: usize, out: &mut [f32]) {
    assert_eq!(x.len(), batch * cols, "x must be (batch, cols)");
    assert_eq!(out.len(), batch * rows, "out must be (batch, rows)");
    assert_eq!(w.len(), rows * cols, "W must be (rows, cols)");
    if batch == 0 || rows == 0 {
        return;
    }
    let ptr = OutPtr(out.as_mut_ptr());
    if let (WeightView::Blocks(format, bytes), BlockActs::F32) = (w, acts) {
        let tile: TileFn<f32> = match kernels {
            #[cfg(target_arch = "x86_64")]
            Simd::Avx2 | Simd::AvxVnni | Simd::Avx512Vnni | Simd::Avx512VnniZmm => f32acts::avx2::tile,
            Simd::Portable => f32acts::tile,
        };
        let shape = if batch == 1 { F32ACTS_TILE_SINGLE } else { F32ACTS_TILE };
        let run = |start, end| unsafe { row_range(|r, b, nr, nb, o| tile(format, bytes, r, cols, x.as_ptr().add(b * cols), nr, nb, o, rows), rows, batch, start, end, shape, ptr) };
        return split_rows(rows, cols * batch, run);
    }
    if let WeightView::Blocks(format, bytes) = w {
        let acts = int8::quantize_acts(x, cols);
        #[cfg(target_arch = "x86_64")]
        let x86_shape = if batch == 1 { INT8_TILE_SINGLE } else { INT8_TILE };
        let (tile, (tile_rows, tile_batch)): (TileFn<int8::ActGroup>, _) = match kernels {
            #[cfg(target_arch = "x86_64")]
            Simd::Avx2 => (int8::avx2::tile, x86_shape),
            #[cfg(target_arch = "x86_64")]
            Simd::AvxVnni => (int8::avx_vnni::tile, x86_shape),
            #[cfg(target_arch = "x86_64")]
            Simd::Avx512Vnni => (int8::avx512_vnni::tile, x86_shape),
            #[cfg(target_arch = "x86_64")]
            Simd::Avx512VnniZmm => (int8::avx512_vnni_zmm::tile, if batch == 1 { INT8_TILE_SINGLE } else { INT8_TILE_ZMM }),
            Simd::Portable => (int8::tile, INT8_PORTABLE_TILE),
        };
        // The tiles index activations by group: a batch row is cols / 32 of them.
        let run = |start, end| unsafe { row_range(|r, b, nr, nb, o| tile(format, bytes, r, cols, acts.as_ptr().add(b * cols / 32), nr, nb, o, rows), rows, batch, start, end, (tile_rows, tile_batch), ptr) };
        return split_rows(rows, cols * batch, run);
    }
    let (tile, tile_rows, tile_batch): (FloatTile, usize, usize) = match kernels {
        #[cfg(target_arch = "x86_64")]
        Simd::Avx2 | Simd::AvxVnni | Simd::Avx512Vnni | Simd::Avx512VnniZmm => (avx2::tile, if batch == 1 { TILE_ROWS_SINGLE } else { TILE_ROWS }, TILE_BATCH),
        Simd::Portable => (portable::tile, PORTABLE_TILE_ROWS, PORTABLE_TILE_BATCH),
    };
    let run = |start, end| unsafe { row_range(|r, b, nr, nb, o| tile(w, r, cols, x.as_ptr().add(b * cols), nr, nb, o, rows), rows, batch, start, end, (tile_rows, tile_batch), ptr) };
    split_rows(rows, cols * batch, run)
}

type FloatTile = unsafe fn(WeightView<'_>, usize, usize, *const f32, usize, usize, *mut f32, usize);
type TileFn<A> = unsafe fn(crate::tensor::WeightFormat, &[u8], usize, usize, *const A, usize, usize, *mut f32, usize);

/// Runs `run(start, end)` over disjoint ranges of the output rows that cover them all: on
/// this thread for small products, else as rayon tasks.
fn split_rows(rows: usize, work_per_row: usize, run: impl Fn(usize, usize) + Sync) {
    let threads = rayon::current_num_threads().max(1);
    if threads == 1 || rows * work_per_row < PARALLEL_MIN_WORK {
        return run(0, rows);
    }
    // Several chunks per thread so uneven cores even out; chunks are whole tiles.
    let chunk = rows.div_ceil(threads * 4).next_multiple_of(12).clamp(12, PANEL_ROWS);
    (0..rows.div_ceil(chunk)).into_par_iter().for_each(|c| {
        let start = c * chunk;
        run(start, (start + chunk).min(rows));
    });
}

/// Output rows `start..end` for every batch row, tile by tile: `tile(row, batch_row, nr, nb,
/// out)` computes nr x nb outputs into `out` (row stride `rows`).
///
/// # Safety
/// `out` must hold (batch, rows) and no other task may write rows `start..end`.
unsafe fn row_range(tile: impl Fn(usize, usize, usize, usize, *mut f32), rows: usize, batch: usize, start: usize, end: usize, (tile_rows, tile_batch): (usize, usize), out: OutPtr) {
    let mut r = start;
    while r < end {
        let nr = (end - r).min(tile_rows);
        let mut b = 0;
        while b < batch {
            let nb = (batch - b).min(tile_batch);
            tile(r, b, nr, nb, out.0.add(b * rows + r));
            b += nb;
        }
        r += nr;
    }
}

/// A kernel family. The VNNI families differ from AVX2 only in the int8 products of block
/// formats (one `vpdpbusd` per group for `maddubs` + `madd`) and give the same bits; float
/// weights and f32 activations take the AVX2 kernels in all three.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Simd {
    #[cfg(target_arch = "x86_64")]
    Avx2,
    /// AVX2 + AVX-VNNI (VEX `vpdpbusd` on 256-bit registers).
    #[cfg(target_arch = "x86_64")]
    AvxVnni,
    /// AVX2 + AVX-512 VNNI (EVEX `vpdpbusd` on 256-bit registers).
    #[cfg(target_arch = "x86_64")]
    Avx512Vnni,
    /// AVX2 + AVX-512 VNNI on 512-bit registers: two (weight row, batch row) pairs per
    /// `vpdpbusd`, each half computing what the 256-bit tiles compute. Only when asked for.
    #[cfg(target_arch = "x86_64")]
    Avx512VnniZmm,
    Portable,
}

impl Simd {
    /// Every family, best first; the 512-bit one last, taken only when named. AVX-512 VNNI on
    /// 256-bit registers beats AVX-VNNI where both exist: the same instruction, but EVEX code
    /// has 32 vector registers, so the tiles keep more in registers (~3-8% at batch >= 8,
    /// Q4_K more; `docs/benchmarks.md`).
    const ALL: &'static [Simd] = &[
        #[cfg(target_arch = "x86_64")]
        Simd::Avx512Vnni,
        #[cfg(target_arch = "x86_64")]
        Simd::AvxVnni,
        #[cfg(target_arch = "x86_64")]
        Simd::Avx2,
        Simd::Portable,
        #[cfg(target_arch = "x86_64")]
        Simd::Avx512VnniZmm,
    ];

    /// What `info["simd"]` says, and the value of `UPG_BATCH_SIMD` that forces it.
    fn name(self) -> &'static str {
        match self {
            #[cfg(target_arch = "x86_64")]
            Simd::Avx2 => "avx2+fma+f16c",
            #[cfg(target_arch = "x86_64")]
            Simd::AvxVnni => "avx2+fma+f16c+avx-vnni",
            #[cfg(target_arch = "x86_64")]
            Simd::Avx512Vnni => "avx2+fma+f16c+avx512-vnni",
            #[cfg(target_arch = "x86_64")]
            Simd::Avx512VnniZmm => "avx2+fma+f16c+avx512-vnni-zmm",
            Simd::Portable => "portable",
        }
    }

    /// The short names `UPG_BATCH_SIMD` also takes.
    fn short_name(self) -> &'static str {
        match self {
            #[cfg(target_arch = "x86_64")]
            Simd::Avx2 => "avx2",
            #[cfg(target_arch = "x86_64")]
            Simd::AvxVnni => "avx-vnni",
            #[cfg(target_arch = "x86_64")]
            Simd::Avx512Vnni => "avx512-vnni",
            #[cfg(target_arch = "x86_64")]
            Simd::Avx512VnniZmm => "avx512-vnni-zmm",
            Simd::Portable => "portable",
        }
    }

    /// Whether this processor runs the family (checked at run time).
    fn available(self) -> bool {
        match self {
            #[cfg(target_arch = "x86_64")]
            Simd::Avx2 => avx2::available(),
            #[cfg(target_arch = "x86_64")]
            Simd::AvxVnni => avx2::available() && std::arch::is_x86_feature_detected!("avxvnni"),
            #[cfg(target_arch = "x86_64")]
            Simd::Avx512Vnni | Simd::Avx512VnniZmm => {
                use std::arch::is_x86_feature_detected as has;
                avx2::available() && has!("avx512f") && has!("avx512bw") && has!("avx512vl") && has!("avx512vnni")
            }
            Simd::Portable => true,
        }
    }

    /// The families this processor runs, best first.
    fn available_families() -> Vec<Simd> {
        Simd::ALL.iter().copied().filter(|f| f.available()).collect()
    }
}

/// The kernel family for this process: the best one the processor has (AVX-512 VNNI, then
/// AVX-VNNI, then AVX2, then plain Rust), unless `UPG_BATCH_SIMD` names one (`portable`,
/// `avx2`, `avx-vnni`, `avx512-vnni`, `avx512-vnni-zmm`, or a full `info["simd"]` name) to
/// test or compare them.
/// A named family this processor lacks falls back to the best one it has, with a warning.
fn simd() -> Simd {
    static CHOICE: OnceLock<Simd> = OnceLock::new();
    *CHOICE.get_or_init(|| {
        let best = Simd::available_families()[0];
        debug_assert_ne!(best.short_name(), "avx512-vnni-zmm");
        let Ok(wanted) = std::env::var("UPG_BATCH_SIMD") else { return best };
        let wanted = wanted.trim().to_ascii_lowercase();
        if wanted.is_empty() {
            return best;
        }
        match Simd::ALL.iter().find(|f| f.short_name() == wanted || f.name() == wanted) {
            Some(&f) if f.available() => f,
            Some(_) => {
                eprintln!("upg-batch: UPG_BATCH_SIMD={wanted}: this processor lacks it; using {}", best.name());
                best
            }
            None => {
                let names: Vec<_> = Simd::ALL.iter().map(|f| f.short_name()).collect();
                eprintln!("upg-batch: UPG_BATCH_SIMD={wanted} is not one of {}; using {}", names.join(", "), best.name());
                best
            }
        }
    })
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
        for (i, &(rows, cols, batch)) in [(1, 1, 1), (5, 7, 2), (4, 8, 3), (13, 67, 5), (64, 64, 1), (130, 259, 7), (256, 512, 33)].iter().enumerate() {
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

    /// Block formats on every kernel family: each output equals, to f32 rounding, the exact
    /// product of the dequantized weights with the dequantized int8 activations (so a decoding
    /// error in any path shows), and each row is bit-identical alone or in the batch.
    #[test]
    fn int8_kernels_compute_the_dequantized_product_and_are_batch_invariant() {
        use crate::tensor::WeightFormat;
        let (rows, cols, batch) = (29, 512, 7);
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(11);
        let values = random(rows * cols, &mut rng);
        let x = random(batch * cols, &mut rng);
        let acts = int8::quantize_acts(&x, cols);
        let xq: Vec<f64> = acts.iter().flat_map(|a| a.q.iter().map(move |&q| a.d as f64 * q as f64)).collect();
        let pool = rayon::ThreadPoolBuilder::new().num_threads(2).build().unwrap();
        let families = Simd::available_families();
        for format in [WeightFormat::Q8_0, WeightFormat::Q4_0, WeightFormat::Q5_0, WeightFormat::Q4K, WeightFormat::Q6K] {
            let bytes = crate::with_block_format!(format, F => crate::quant::quantize::<F>(&values));
            let w = WeightView::Blocks(format, &bytes);
            for &family in &families {
                let mut batched = vec![0f32; batch * rows];
                pool.install(|| matmul_using(family, BlockActs::Int8, w, rows, cols, &x, batch, &mut batched));
                for b in 0..batch {
                    for r in 0..rows {
                        let want: f64 = (0..cols).map(|k| w.get(r * cols + k) as f64 * xq[b * cols + k]).sum();
                        let got = batched[b * rows + r] as f64;
                        assert!((got - want).abs() <= 1e-5 * want.abs().max(1.0), "{} ({}): row {r} batch {b}: {got} vs {want}", format.name(), family as u8);
                    }
                    let mut alone = vec![0f32; rows];
                    matmul_using(family, BlockActs::Int8, w, rows, cols, &x[b * cols..(b + 1) * cols], 1, &mut alone);
                    assert!(alone.iter().zip(&batched[b * rows..(b + 1) * rows]).all(|(p, q)| p.to_bits() == q.to_bits()), "{}: row {b} alone differs", format.name());
                }
            }
        }
    }

    /// The families this processor has, by the CPUID flags read independently of `Simd`.
    fn expected_families() -> Vec<Simd> {
        #[cfg(target_arch = "x86_64")]
        {
            use std::arch::is_x86_feature_detected as has;
            let avx2 = has!("avx2") && has!("fma") && has!("f16c");
            let avx512 = avx2 && has!("avx512f") && has!("avx512bw") && has!("avx512vl") && has!("avx512vnni");
            let mut want = Vec::new();
            if avx512 {
                want.push(Simd::Avx512Vnni);
            }
            if avx2 && has!("avxvnni") {
                want.push(Simd::AvxVnni);
            }
            if avx2 {
                want.push(Simd::Avx2);
            }
            want.push(Simd::Portable);
            if avx512 {
                want.push(Simd::Avx512VnniZmm);
            }
            want
        }
        #[cfg(not(target_arch = "x86_64"))]
        vec![Simd::Portable]
    }

    /// The VNNI families (one `vpdpbusd` per group) against AVX2 (`maddubs` + `madd`): both
    /// take exact integer sums, so every output must be bit-identical, for every block format,
    /// ragged tiles (rows not a multiple of the tile, batches 1..9 and 33), several threads,
    /// extreme groups (q8_0 weights of -128 and 127 against activations of +-127, where a
    /// `maddubs` pair reaches 32512) and each row alone. On a processor without VNNI this
    /// checks AVX2 alone and says so on stderr (`cargo test -- --nocapture` shows it).
    #[test]
    fn vnni_int8_kernels_are_bit_identical_to_avx2() {
        use crate::tensor::WeightFormat;
        let families = Simd::available_families();
        assert_eq!(families, expected_families(), "the families this processor has");
        let vnni: Vec<Simd> = families.iter().copied().filter(|f| f.name().contains("vnni")).collect();
        eprintln!("int8 families on this processor: {:?}", families.iter().map(|f| f.name()).collect::<Vec<_>>());
        #[cfg(target_arch = "x86_64")]
        if !families.contains(&Simd::Avx2) {
            eprintln!("no AVX2 here: nothing to compare");
            return;
        }
        if vnni.is_empty() {
            eprintln!("no VNNI on this processor: this test covers only the AVX2 family here");
        }
        let pool = rayon::ThreadPoolBuilder::new().num_threads(3).build().unwrap();
        let mut compared = 0;
        for (i, &(rows, cols, batch)) in [(1, 256, 1), (7, 256, 9), (29, 512, 7), (64, 1024, 33), (5, 768, 2), (130, 256, 4)].iter().enumerate() {
            let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(40 + i as u64);
            let mut values = random(rows * cols, &mut rng);
            let mut x = random(batch * cols, &mut rng);
            if i == 2 {
                // Extreme groups: weights at +-max so q8_0 holds 127 and, written below, -128.
                for v in values.iter_mut().take(64) {
                    *v = if *v < 0.0 { -1.0 } else { 1.0 };
                }
                for v in x.iter_mut().take(64) {
                    *v = if *v < 0.0 { -1.0 } else { 1.0 };
                }
            }
            for format in [WeightFormat::Q8_0, WeightFormat::Q4_0, WeightFormat::Q5_0, WeightFormat::Q4K, WeightFormat::Q6K] {
                let mut bytes = crate::with_block_format!(format, F => crate::quant::quantize::<F>(&values));
                if i == 2 && format == WeightFormat::Q8_0 {
                    // The quantizer never writes -128; a GGUF file may. First block of row 0.
                    for j in 0..32 {
                        if bytes[2 + j] as i8 == -127 {
                            bytes[2 + j] = -128i8 as u8;
                        }
                    }
                }
                let w = WeightView::Blocks(format, &bytes);
                let run = |family: Simd, x: &[f32], batch: usize| {
                    let mut out = vec![0f32; batch * rows];
                    pool.install(|| matmul_using(family, BlockActs::Int8, w, rows, cols, x, batch, &mut out));
                    out
                };
                #[cfg(target_arch = "x86_64")]
                let want = run(Simd::Avx2, &x, batch);
                #[cfg(not(target_arch = "x86_64"))]
                let want = run(Simd::Portable, &x, batch);
                for &family in &vnni {
                    let got = run(family, &x, batch);
                    for (k, (p, q)) in got.iter().zip(&want).enumerate() {
                        assert_eq!(p.to_bits(), q.to_bits(), "{} {} ({rows}x{cols}, batch {batch}) element {k}: {p} vs AVX2 {q}", family.name(), format.name());
                    }
                    for b in [0, batch / 2, batch - 1] {
                        let alone = run(family, &x[b * cols..(b + 1) * cols], 1);
                        assert!(alone.iter().zip(&want[b * rows..(b + 1) * rows]).all(|(p, q)| p.to_bits() == q.to_bits()), "{} {}: row {b} alone differs", family.name(), format.name());
                    }
                    compared += 1;
                }
            }
        }
        assert_eq!(compared, 6 * 5 * vnni.len());
        eprintln!("compared {} VNNI families bit for bit against AVX2 on {compared} (shape, format) cases", vnni.len());
    }

    /// f32 activations on every kernel family: each output equals the exact product of the
    /// dequantized weights with x to f32 rounding (far tighter than the int8 path), and each
    /// row is bit-identical alone or in the batch.
    #[test]
    fn f32_activation_kernels_compute_the_dequantized_product_and_are_batch_invariant() {
        use crate::tensor::WeightFormat;
        let (rows, cols, batch) = (23, 768, 6);
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(12);
        let values = random(rows * cols, &mut rng);
        let x = random(batch * cols, &mut rng);
        let pool = rayon::ThreadPoolBuilder::new().num_threads(2).build().unwrap();
        let mut families = vec![Simd::Portable];
        #[cfg(target_arch = "x86_64")]
        if avx2::available() {
            families.push(Simd::Avx2);
        }
        for format in [WeightFormat::Q8_0, WeightFormat::Q4_0, WeightFormat::Q5_0, WeightFormat::Q4K, WeightFormat::Q6K] {
            let bytes = crate::with_block_format!(format, F => crate::quant::quantize::<F>(&values));
            let w = WeightView::Blocks(format, &bytes);
            let reference = matmul_reference(w, rows, cols, &x, batch);
            for &family in &families {
                let mut batched = vec![0f32; batch * rows];
                pool.install(|| matmul_using(family, BlockActs::F32, w, rows, cols, &x, batch, &mut batched));
                for (i, (got, want)) in batched.iter().zip(&reference).enumerate() {
                    assert!((got - want).abs() <= 2e-6 * (cols as f32).sqrt() * want.abs().max(1.0), "{} ({}): element {i}: {got} vs {want}", format.name(), family as u8);
                }
                for b in 0..batch {
                    let mut alone = vec![0f32; rows];
                    matmul_using(family, BlockActs::F32, w, rows, cols, &x[b * cols..(b + 1) * cols], 1, &mut alone);
                    assert!(alone.iter().zip(&batched[b * rows..(b + 1) * rows]).all(|(p, q)| p.to_bits() == q.to_bits()), "{}: row {b} alone differs", format.name());
                }
            }
        }
    }

    #[test]
    fn portable_kernels_match_reference_and_are_batch_invariant() {
        let (rows, cols) = (37, 203);
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(9);
        let w32 = random(rows * cols, &mut rng);
        let w16: Vec<f16> = w32.iter().map(|&v| f16::from_f32(v)).collect();
        let wb16: Vec<bf16> = w32.iter().map(|&v| bf16::from_f32(v)).collect();
        let x = random(7 * cols, &mut rng);
        let pool = rayon::ThreadPoolBuilder::new().num_threads(2).build().unwrap();
        for w in [WeightView::F32(&w32), WeightView::F16(&w16), WeightView::Bf16(&wb16)] {
            let mut batched = vec![0f32; 7 * rows];
            pool.install(|| matmul_using(Simd::Portable, BlockActs::Int8, w, rows, cols, &x, 7, &mut batched));
            let reference = matmul_reference(w, rows, cols, &x, 7);
            for (i, (a, b)) in batched.iter().zip(&reference).enumerate() {
                assert!((a - b).abs() < 1e-4, "element {i}: {a} vs reference {b}");
            }
            for b in 0..7 {
                let mut alone = vec![0f32; rows];
                matmul_using(Simd::Portable, BlockActs::Int8, w, rows, cols, &x[b * cols..(b + 1) * cols], 1, &mut alone);
                assert!(alone.iter().zip(&batched[b * rows..(b + 1) * rows]).all(|(p, q)| p.to_bits() == q.to_bits()), "row {b}");
            }
        }
    }
}

/// Which matrix-product path this process runs.
pub fn simd_name() -> &'static str {
    simd().name()
}
