//! Measures the machine's memory read bandwidth: the ceiling for batch-1 decode, which must
//! stream every weight once per token.

use std::time::Instant;

use rayon::prelude::*;

/// Best of `repeats` timed parallel reads of a `bytes`-sized buffer on `threads` threads, in
/// bytes per second.
pub fn read_bandwidth(bytes: usize, threads: usize, repeats: usize) -> f64 {
    let n = (bytes / 4).max(1 << 16);
    let data: Vec<f32> = (0..n).map(|i| (i % 7) as f32).collect();
    let pool = rayon::ThreadPoolBuilder::new().num_threads(threads.max(1)).build().expect("thread pool");
    let mut best = f64::INFINITY;
    let mut sink = 0f32;
    for _ in 0..repeats.max(1) {
        let t = Instant::now();
        // 64 independent lanes (eight vector registers) keep add latency from bounding the
        // loop, so memory is the limit.
        let s: f32 = pool.install(|| {
            data.par_chunks(1 << 18)
                .map(|c| {
                    let mut acc = [0f32; 64];
                    for v in c.chunks_exact(64) {
                        for l in 0..64 {
                            acc[l] += v[l];
                        }
                    }
                    acc.iter().sum::<f32>()
                })
                .sum()
        });
        best = best.min(t.elapsed().as_secs_f64());
        sink += s;
    }
    std::hint::black_box(sink);
    (n * 4) as f64 / best
}

/// The machine's f32 multiply-add peak on `threads` threads, in FLOP/s (a fused multiply-add
/// counts 2): independent chains of FMAs on 96 lanes (twelve 8-lane registers), so neither
/// latency nor memory bounds it. The ceiling for compute-bound products with f32 arithmetic.
pub fn fma_peak(threads: usize) -> f64 {
    const ITERS: usize = 160_000_000;
    let threads = threads.max(1);
    let pool = rayon::ThreadPoolBuilder::new().num_threads(threads).build().expect("thread pool");
    let mut best = f64::INFINITY;
    for _ in 0..3 {
        let t = Instant::now();
        let s: f32 = pool.install(|| (0..threads).into_par_iter().map(|i| fma_chains(ITERS / 8, 1.0 + i as f32 * 1e-7)).sum());
        best = best.min(t.elapsed().as_secs_f64());
        std::hint::black_box(s);
    }
    (threads * ITERS / 8 * 96 * 2) as f64 / best
}

fn fma_chains(iters: usize, seed: f32) -> f32 {
    #[cfg(target_arch = "x86_64")]
    if is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma") {
        // SAFETY: the features were just detected.
        return unsafe { fma_chains_avx2(iters, seed) };
    }
    fma_chains_plain(iters, seed)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn fma_chains_avx2(iters: usize, seed: f32) -> f32 {
    fma_chains_plain(iters, seed)
}

#[inline(always)]
fn fma_chains_plain(iters: usize, seed: f32) -> f32 {
    let mut acc = [seed; 96];
    let (a, b) = (std::hint::black_box(0.999_99f32), std::hint::black_box(1e-6f32));
    for _ in 0..iters {
        for v in acc.iter_mut() {
            *v = v.mul_add(a, b);
        }
    }
    acc.iter().sum()
}
