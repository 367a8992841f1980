//! Throughput of the CPU matrix product for a TinyLlama-sized weight at several batch sizes:
//! GFLOP/s and weight GB/s. `cargo run --release --example matmul_bench -- [threads] [f16|f32]`
//! Also prints GFLOP per CPU-second (process CPU time), which stays meaningful on a busy
//! machine where wall time does not.

use std::time::Instant;

use half::f16;
use upg_batch_native::backend::cpu::matmul::matmul;
use upg_batch_native::backend::cpu::weights::WeightView;

fn main() {
    let threads: usize = std::env::args().nth(1).and_then(|s| s.parse().ok()).unwrap_or(2);
    let f32_weights = std::env::args().nth(2).as_deref() == Some("f32");
    let pool = rayon::ThreadPoolBuilder::new().num_threads(threads).build().unwrap();
    for &(rows, cols) in &[(5632usize, 2048usize), (2048, 5632)] {
        let w32: Vec<f32> = (0..rows * cols).map(|i| ((i % 13) as f32 - 6.0) * 0.01).collect();
        let w16: Vec<f16> = w32.iter().map(|&v| f16::from_f32(v)).collect();
        let w = if f32_weights { WeightView::F32(&w32) } else { WeightView::F16(&w16) };
        let name = if f32_weights { "f32" } else { "f16" };
        for &batch in &[1usize, 8, 32, 64] {
            let x: Vec<f32> = (0..batch * cols).map(|i| ((i % 7) as f32 - 3.0) * 0.1).collect();
            let mut out = vec![0f32; batch * rows];
            let reps = (64 / batch).max(3);
            pool.install(|| matmul(w, rows, cols, &x, batch, &mut out));
            let t = Instant::now();
            let c0 = cpu_seconds();
            for _ in 0..reps {
                pool.install(|| matmul(w, rows, cols, &x, batch, &mut out));
            }
            let s = t.elapsed().as_secs_f64() / reps as f64;
            let cpu = (cpu_seconds() - c0) / reps as f64;
            let flops = 2.0 * (rows * cols * batch) as f64;
            println!(
                "W ({rows}, {cols}) {name}, batch {batch:>2}: {:>8.3} ms  {:>6.1} GFLOP/s  {:>5.1} GB/s of weights  {:>6.1} GFLOP/cpu-s",
                s * 1e3,
                flops / s / 1e9,
                (rows * cols * if f32_weights { 4 } else { 2 }) as f64 / s / 1e9,
                flops / cpu / 1e9
            );
        }
    }
}

fn cpu_seconds() -> f64 {
    let mut ts = libc::timespec { tv_sec: 0, tv_nsec: 0 };
    // SAFETY: a valid out-pointer for clock_gettime.
    unsafe { libc::clock_gettime(libc::CLOCK_PROCESS_CPUTIME_ID, &mut ts) };
    ts.tv_sec as f64 + ts.tv_nsec as f64 * 1e-9
}
