//! Block-quantized weight formats with the exact byte layouts of GGUF/ggml, so that tensors of
//! a GGUF file can be used as they are: Q8_0, Q4_0, Q5_0 (blocks of 32 weights) and the
//! k-quants Q4_K and Q6_K (super-blocks of 256). Each format is its own module holding its
//! layout, its quantizer (ggml's reference algorithm, so that a quantized checkpoint matches
//! llama.cpp's own quantization without an importance matrix) and its decoder.
//!
//! Every format decodes a group of 32 consecutive weights to small integers and at most two
//! scales and one offset: w_j = scale[j / 16] * q_j - min. The CPU kernels take products in
//! that form against int8 activations; dequantization is the same formula in f32.

use half::f16;

pub mod q4_0;
pub mod q4_k;
pub mod q5_0;
pub mod q6_k;
pub mod q8_0;

#[cfg(target_arch = "x86_64")]
pub(crate) mod avx2_util;

/// Weights per group: the unit of the CPU kernels and of quantized activations.
pub const GROUP: usize = 32;

/// 32 consecutive weights of a block as integers: w_j = scale[j / 16] * q_j - min.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Group {
    pub q: [i8; GROUP],
    pub scale: [f32; 2],
    pub min: f32,
}

impl Group {
    #[inline]
    pub fn weight(&self, j: usize) -> f32 {
        self.scale[j / 16] * self.q[j] as f32 - self.min
    }
}

/// A block format: its size, its quantizer and its decoder.
pub trait BlockFormat {
    /// Weights and bytes per block.
    const WEIGHTS: usize;
    const BYTES: usize;
    /// Whether groups carry an offset (`min`); when not, it is always 0.
    const HAS_MIN: bool;
    /// Appends the blocks of `values` (whole blocks).
    fn quantize(values: &[f32], out: &mut Vec<u8>);
    /// Group `g` (< WEIGHTS / 32) of the block at the start of `block`.
    fn group(block: &[u8], g: usize) -> Group;
}

/// f16 little-endian at `b[at..at + 2]`, as f32.
#[inline]
pub(crate) fn f16_at(b: &[u8], at: usize) -> f32 {
    f16::from_le_bytes([b[at], b[at + 1]]).to_f32()
}

/// ggml's `nearest_int`: round to nearest, ties to even. Its trick (adding 1.5 * 2^23 leaves
/// the rounded integer in the low mantissa bits, in the current rounding mode: to nearest,
/// ties to even) is a few instructions where `round_ties_even` is a libm call on baseline
/// x86-64; it holds while the result stays below 2^22, and larger values take the library path.
#[inline]
pub(crate) fn nearest_int(v: f32) -> i32 {
    if v.abs() < 4194303.5 {
        let bits = (v + 12582912.0).to_bits() as i32;
        (bits & 0x007f_ffff) - 0x0040_0000
    } else {
        v.round_ties_even() as i32
    }
}

/// The signed value with the largest magnitude (the first one on ties), and that magnitude.
pub(crate) fn signed_absmax(x: &[f32]) -> (f32, f32) {
    let (mut max, mut amax) = (0f32, 0f32);
    for &v in x {
        if amax < v.abs() {
            amax = v.abs();
            max = v;
        }
    }
    (max, amax)
}

/// The scale of ggml's Q4_0 / Q5_0 blocks: d = (the value of largest magnitude) / -half, and
/// its inverse (0 for an all-zero block).
pub(crate) fn signed_scale(x: &[f32], half: f32) -> (f32, f32) {
    let (max, _) = signed_absmax(x);
    let d = max / -half;
    (d, if d != 0.0 { 1.0 / d } else { 0.0 })
}

/// Quantizes `values` (whole blocks of F) into F's bytes.
pub fn quantize<F: BlockFormat>(values: &[f32]) -> Vec<u8> {
    assert_eq!(values.len() % F::WEIGHTS, 0, "quantizing needs whole blocks of {}", F::WEIGHTS);
    use rayon::prelude::*;
    // Blocks are independent: quantize spans of them on every core.
    const SPAN: usize = 1 << 16;
    let span = SPAN / F::WEIGHTS * F::WEIGHTS;
    let parts: Vec<Vec<u8>> = values
        .par_chunks(span)
        .map(|chunk| {
            let mut out = Vec::with_capacity(chunk.len() / F::WEIGHTS * F::BYTES);
            F::quantize(chunk, &mut out);
            out
        })
        .collect();
    let out = parts.concat();
    debug_assert_eq!(out.len(), values.len() / F::WEIGHTS * F::BYTES);
    out
}

/// Every weight of whole blocks of F, as f32.
pub fn dequantize<F: BlockFormat>(bytes: &[u8]) -> Vec<f32> {
    let mut out = Vec::with_capacity(bytes.len() / F::BYTES * F::WEIGHTS);
    for block in bytes.chunks_exact(F::BYTES) {
        for g in 0..F::WEIGHTS / GROUP {
            let group = F::group(block, g);
            out.extend((0..GROUP).map(|j| group.weight(j)));
        }
    }
    out
}

/// Weight `i` of whole blocks of F.
#[inline]
pub fn weight<F: BlockFormat>(bytes: &[u8], i: usize) -> f32 {
    let block = &bytes[i / F::WEIGHTS * F::BYTES..];
    let within = i % F::WEIGHTS;
    F::group(block, within / GROUP).weight(within % GROUP)
}

/// Calls `$body` with `$F` bound to the block format type of `$format` (a block format).
#[macro_export]
macro_rules! with_block_format {
    ($format:expr, $F:ident => $body:expr) => {{
        use $crate::tensor::WeightFormat;
        match $format {
            WeightFormat::Q8_0 => {
                type $F = $crate::quant::q8_0::Q8_0;
                $body
            }
            WeightFormat::Q4_0 => {
                type $F = $crate::quant::q4_0::Q4_0;
                $body
            }
            WeightFormat::Q5_0 => {
                type $F = $crate::quant::q5_0::Q5_0;
                $body
            }
            WeightFormat::Q4K => {
                type $F = $crate::quant::q4_k::Q4K;
                $body
            }
            WeightFormat::Q6K => {
                type $F = $crate::quant::q6_k::Q6K;
                $body
            }
            other => unreachable!("{} is not a block format", other.name()),
        }
    }};
}

#[cfg(test)]
mod tests {
    #[test]
    fn nearest_int_rounds_half_to_even_like_the_library() {
        let mut cases: Vec<f32> = vec![0.0, -0.0, 0.5, 1.5, 2.5, -0.5, -1.5, -2.5, 0.49999997, 4194303.5, -4194303.5, 4194304.0, 1e9, -1e9, 15.5, 63.5];
        let mut x = 0x1234_5678u32;
        for _ in 0..100_000 {
            x ^= x << 13;
            x ^= x >> 17;
            x ^= x << 5;
            cases.push((x as i32) as f32 / 1000.0);
            cases.push((x % 64) as f32 / 2.0 - 16.0);
        }
        for v in cases {
            assert_eq!(super::nearest_int(v), v.round_ties_even() as i32, "{v}");
        }
    }

    use rand::{Rng, SeedableRng};

    use super::*;
    use crate::tensor::WeightFormat;

    const FORMATS: [WeightFormat; 5] = [WeightFormat::Q8_0, WeightFormat::Q4_0, WeightFormat::Q5_0, WeightFormat::Q4K, WeightFormat::Q6K];

    fn normal(n: usize, seed: u64) -> Vec<f32> {
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
        // Sum of uniforms: roughly normal, with occasional larger values.
        (0..n).map(|_| (0..4).map(|_| rng.gen_range(-1.0f32..1.0)).sum::<f32>() * 0.02).collect()
    }

    /// Root-mean-square error relative to the values' rms, per format: what ggml's formats
    /// give on gaussian weights (8-bit ~0.4%, 6-bit ~2%, 5-bit ~4%, 4-bit ~8-9%).
    fn relative_rms_error(format: WeightFormat, values: &[f32]) -> f64 {
        let back = with_block_format!(format, F => dequantize::<F>(&quantize::<F>(values)));
        let err: f64 = values.iter().zip(&back).map(|(a, b)| ((a - b) as f64).powi(2)).sum();
        let norm: f64 = values.iter().map(|a| (*a as f64).powi(2)).sum();
        (err / norm).sqrt()
    }

    #[test]
    fn every_format_round_trips_within_its_error() {
        let values = normal(256 * 64, 1);
        for (format, bound) in FORMATS.into_iter().zip([0.006, 0.12, 0.06, 0.10, 0.03]) {
            let e = relative_rms_error(format, &values);
            assert!(e < bound, "{}: relative rms error {e:.4} above {bound}", format.name());
            assert!(e > bound / 20.0, "{}: relative rms error {e:.5} implausibly small", format.name());
        }
    }

    #[test]
    fn sizes_are_ggml_block_sizes() {
        let sizes: Vec<(usize, usize)> = FORMATS.iter().map(|f| f.block()).collect();
        assert_eq!(sizes, [(32, 34), (32, 18), (32, 22), (256, 144), (256, 210)]);
        for format in FORMATS {
            let bytes = with_block_format!(format, F => quantize::<F>(&normal(512, 2)));
            assert_eq!(bytes.len(), format.row_bytes(512), "{}", format.name());
        }
    }

    #[test]
    fn single_weights_match_whole_dequantization() {
        for format in FORMATS {
            let values = normal(512, 3);
            with_block_format!(format, F => {
                let bytes = quantize::<F>(&values);
                let all = dequantize::<F>(&bytes);
                for i in (0..512).step_by(7) {
                    assert_eq!(weight::<F>(&bytes, i).to_bits(), all[i].to_bits(), "{} weight {i}", format.name());
                }
            });
        }
    }

    #[test]
    fn zero_blocks_stay_exact() {
        for format in FORMATS {
            let zeros = vec![0f32; 256];
            let back = with_block_format!(format, F => dequantize::<F>(&quantize::<F>(&zeros)));
            assert!(back.iter().all(|&v| v == 0.0), "{}: zeros", format.name());
        }
    }
}
