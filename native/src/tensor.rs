//! Leaf types shared by every layer of the engine: the dtype a checkpoint stores, the format
//! the engine holds weights in, and a borrowed host view of one tensor's bytes.
//!
//! A stored dtype and a held format are different things: an f16 checkpoint can be held as
//! f32, a bf16 one as f16. Quantized formats enter as new variants of both, each with one
//! kernel per backend.

use std::sync::Arc;

use half::{bf16, f16};
use memmap2::Mmap;

/// The in-memory format of weight matrices (`weights=` option). Arithmetic is always f32.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum WeightFormat {
    F32,
    F16,
    Bf16,
    /// GGUF's Q8_0: blocks of 32 weights, each an f16 scale d then 32 int8 q (34 bytes);
    /// a weight is d * q. Quantized at load from 16- and 32-bit checkpoints.
    Q8_0,
}

/// What a checkpoint file stores for one tensor (safetensors files store the 16- and 32-bit
/// formats only).
pub type DType = WeightFormat;

/// Weights per Q8_0 block, and its bytes.
pub const Q8_0_BLOCK: usize = 32;
pub const Q8_0_BLOCK_BYTES: usize = 34;

impl WeightFormat {
    pub fn parse(name: &str) -> Option<Self> {
        match name {
            "f32" | "float32" => Some(WeightFormat::F32),
            "f16" | "float16" => Some(WeightFormat::F16),
            "bf16" | "bfloat16" => Some(WeightFormat::Bf16),
            "q8_0" => Some(WeightFormat::Q8_0),
            _ => None,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            WeightFormat::F32 => "f32",
            WeightFormat::F16 => "f16",
            WeightFormat::Bf16 => "bf16",
            WeightFormat::Q8_0 => "q8_0",
        }
    }

    /// (weights, bytes) of one block: a single element for the plain formats.
    pub fn block(self) -> (usize, usize) {
        match self {
            WeightFormat::F32 => (1, 4),
            WeightFormat::F16 | WeightFormat::Bf16 => (1, 2),
            WeightFormat::Q8_0 => (Q8_0_BLOCK, Q8_0_BLOCK_BYTES),
        }
    }

    /// Whether rows of `cols` weights are whole blocks of this format. A matrix whose rows
    /// are not is held in a 16-bit format instead (as llama.cpp does).
    pub fn fits_row(self, cols: usize) -> bool {
        cols % self.block().0 == 0
    }

    /// Bytes of one row of `cols` weights (`fits_row(cols)`).
    pub fn row_bytes(self, cols: usize) -> usize {
        let (n, bytes) = self.block();
        debug_assert!(cols % n == 0);
        cols / n * bytes
    }

    /// Whether values are held exactly as one element each (f32, f16, bf16).
    pub fn is_plain(self) -> bool {
        self.block().0 == 1
    }
}

/// Quantizes `values` (whole Q8_0 blocks) as ggml's reference does: d = max|v| / 127 rounded to
/// f16, q = round(v / d) (halves away from zero).
pub fn quantize_q8_0(values: &[f32]) -> Vec<u8> {
    assert_eq!(values.len() % Q8_0_BLOCK, 0, "Q8_0 needs whole blocks of 32");
    let mut out = Vec::with_capacity(values.len() / Q8_0_BLOCK * Q8_0_BLOCK_BYTES);
    for block in values.chunks_exact(Q8_0_BLOCK) {
        let amax = block.iter().fold(0f32, |m, v| m.max(v.abs()));
        let d = amax / 127.0;
        let id = if d != 0.0 { 1.0 / d } else { 0.0 };
        out.extend_from_slice(&f16::from_f32(d).to_le_bytes());
        out.extend(block.iter().map(|&v| (v * id).round() as i8 as u8));
    }
    out
}

/// Weight `j` (< 32) of the Q8_0 block at the start of `block`, as f32 (exact).
#[inline]
pub fn q8_0_weight(block: &[u8], j: usize) -> f32 {
    f16::from_le_bytes([block[0], block[1]]).to_f32() * (block[2 + j] as i8) as f32
}

/// Every weight of whole Q8_0 blocks, as f32.
pub fn dequantize_q8_0(bytes: &[u8]) -> Vec<f32> {
    bytes.chunks_exact(Q8_0_BLOCK_BYTES).flat_map(|b| (0..Q8_0_BLOCK).map(move |j| q8_0_weight(b, j))).collect()
}

/// One tensor of a checkpoint as it sits in a mapped file: its stored dtype, its shape and
/// its byte range (checked against the file by the checkpoint reader). Backends upload from
/// it; the CPU backend may keep a zero-copy view of the mapping.
#[derive(Clone)]
pub struct HostTensor<'a> {
    pub name: &'a str,
    pub dtype: DType,
    pub shape: &'a [usize],
    pub map: &'a Arc<Mmap>,
    /// Byte range within `map`.
    pub start: usize,
    pub end: usize,
}

impl HostTensor<'_> {
    pub fn bytes(&self) -> &[u8] {
        &self.map[self.start..self.end]
    }

    pub fn elements(&self) -> usize {
        self.shape.iter().product()
    }

    /// Whether the data may be viewed in place as `format` (same dtype, aligned for it).
    pub fn viewable_as(&self, format: WeightFormat) -> bool {
        format.is_plain() && self.dtype == format && (self.map.as_ptr() as usize + self.start) % format.block().1 == 0
    }

    /// All elements as f32, read byte by byte (the data may sit at any alignment).
    pub fn to_f32(&self) -> Vec<f32> {
        let bytes = self.bytes();
        match self.dtype {
            DType::F32 => bytes.chunks_exact(4).map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]])).collect(),
            DType::F16 => bytes.chunks_exact(2).map(|b| f16::from_le_bytes([b[0], b[1]]).to_f32()).collect(),
            DType::Bf16 => bytes.chunks_exact(2).map(|b| bf16::from_le_bytes([b[0], b[1]]).to_f32()).collect(),
            DType::Q8_0 => dequantize_q8_0(bytes),
        }
    }

    /// The elements in `format`, as little-endian bytes: copied when the dtype already is
    /// `format`, converted through f32 otherwise (exact for f16/bf16 -> f32; rounded to
    /// nearest for narrowing conversions).
    pub fn to_format_bytes(&self, format: WeightFormat) -> Vec<u8> {
        if self.dtype == format {
            return self.bytes().to_vec();
        }
        let values = self.to_f32();
        match format {
            WeightFormat::F32 => bytemuck::cast_slice(&values).to_vec(),
            WeightFormat::F16 => values.iter().flat_map(|&v| f16::from_f32(v).to_le_bytes()).collect(),
            WeightFormat::Bf16 => values.iter().flat_map(|&v| bf16::from_f32(v).to_le_bytes()).collect(),
            WeightFormat::Q8_0 => quantize_q8_0(&values),
        }
    }
}
