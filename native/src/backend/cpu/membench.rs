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
