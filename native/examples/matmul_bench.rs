//! Throughput of the CPU matrix product for TinyLlama-sized weights at several batch sizes:
//! GFLOP/s and weight GB/s. `cargo run --release --example matmul_bench -- [threads] [format]`
//! (format: f32, f16, bf16, q8_0, q4_0, q5_0, q4_k, q6_k). Products cycle over copies of the
//! weights larger than the caches together, so batch 1 streams from memory as decode does.
//! Also prints GFLOP per CPU-second (process CPU time), which stays meaningful on a busy
//! machine where wall time does not. The kernel family is the engine's (printed first);
//! `UPG_BATCH_SIMD=avx2` (or `avx-vnni`, `avx512-vnni`, `portable`) forces one to compare.

use std::time::Instant;

use half::{bf16, f16};
use upg_batch_native::backend::cpu::matmul::matmul;
use upg_batch_native::backend::cpu::weights::WeightView;
use upg_batch_native::quant;
use upg_batch_native::tensor::WeightFormat;

enum Held {
    F32(Vec<f32>),
    F16(Vec<f16>),
    Bf16(Vec<bf16>),
    Blocks(WeightFormat, Vec<u8>),
}

impl Held {
    fn new(format: WeightFormat, values: &[f32]) -> Self {
        match format {
            WeightFormat::F32 => Held::F32(values.to_vec()),
            WeightFormat::F16 => Held::F16(values.iter().map(|&v| f16::from_f32(v)).collect()),
            WeightFormat::Bf16 => Held::Bf16(values.iter().map(|&v| bf16::from_f32(v)).collect()),
            block => Held::Blocks(block, upg_batch_native::with_block_format!(block, F => quant::quantize::<F>(values))),
        }
    }

    fn view(&self) -> WeightView<'_> {
        match self {
            Held::F32(v) => WeightView::F32(v),
            Held::F16(v) => WeightView::F16(v),
            Held::Bf16(v) => WeightView::Bf16(v),
            Held::Blocks(f, v) => WeightView::Blocks(*f, v),
        }
    }
}

fn main() {
    let threads: usize = std::env::args().nth(1).and_then(|s| s.parse().ok()).unwrap_or(2);
    let name = std::env::args().nth(2).unwrap_or_else(|| "f16".into());
    let format = WeightFormat::parse(&name).expect("a weight format");
    let (per_block, block_bytes) = format.block();
    let pool = rayon::ThreadPoolBuilder::new().num_threads(threads).build().unwrap();
    println!("simd {}, {threads} threads", upg_batch_native::backend::cpu::matmul::simd_name());
    for &(rows, cols) in &[(5632usize, 2048usize), (2048, 5632)] {
        let values: Vec<f32> = (0..rows * cols).map(|i| (((i * 7919) % 13) as f32 - 6.0) * 0.01).collect();
        let bytes = rows * cols / per_block * block_bytes;
        let copies = (512 << 20) / bytes + 1;
        let held: Vec<Held> = (0..copies).map(|_| Held::new(format, &values)).collect();
        for &batch in &[1usize, 8, 32, 64] {
            let x: Vec<f32> = (0..batch * cols).map(|i| ((i % 7) as f32 - 3.0) * 0.1).collect();
            let mut out = vec![0f32; batch * rows];
            let reps = (copies * 4 / batch).max(3);
            pool.install(|| matmul(held[0].view(), rows, cols, &x, batch, &mut out));
            let t = Instant::now();
            let c0 = cpu_seconds();
            for i in 0..reps {
                pool.install(|| matmul(held[i % copies].view(), rows, cols, &x, batch, &mut out));
            }
            let s = t.elapsed().as_secs_f64() / reps as f64;
            let cpu = (cpu_seconds() - c0) / reps as f64;
            let flops = 2.0 * (rows * cols * batch) as f64;
            println!(
                "W ({rows}, {cols}) {name}, batch {batch:>2}: {:>8.3} ms  {:>6.1} GFLOP/s  {:>5.1} GB/s of weights  {:>6.1} GFLOP/cpu-s",
                s * 1e3,
                flops / s / 1e9,
                bytes as f64 / s / 1e9,
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
