//! The CPU backend: SIMD matrix products (AVX2/FMA/F16C where the processor has them, plain
//! Rust elsewhere) and row-wise kernels, multi-threaded with rayon.

pub mod attention;
pub mod membench;
pub mod matmul;
pub mod ops;
