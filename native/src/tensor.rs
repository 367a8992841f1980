//! Leaf types shared by every layer of the engine: the dtype a checkpoint stores, the format
//! the engine holds weights in, and a borrowed host view of one tensor's bytes.
//!
//! A stored dtype and a held format are different things: an f16 checkpoint can be held as
//! f32, a bf16 one as f16. Quantized formats enter as new variants of both, each with one
//! kernel per backend.

use std::sync::Arc;

use half::{bf16, f16};

use crate::quant::{self, BlockFormat};
use crate::with_block_format;

/// The in-memory format of weight matrices (`weights=` option). Arithmetic is always f32.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum WeightFormat {
    F32,
    F16,
    Bf16,
    /// GGUF/ggml block formats (layouts in `crate::quant`), quantized at load from 16- and
    /// 32-bit checkpoints.
    Q8_0,
    Q4_0,
    Q5_0,
    Q4K,
    Q6K,
}

/// What a checkpoint file stores for one tensor (safetensors files store the 16- and 32-bit
/// formats only).
pub type DType = WeightFormat;

impl WeightFormat {
    pub const ALL: [WeightFormat; 8] =
        [WeightFormat::F32, WeightFormat::F16, WeightFormat::Bf16, WeightFormat::Q8_0, WeightFormat::Q4_0, WeightFormat::Q5_0, WeightFormat::Q4K, WeightFormat::Q6K];

    pub fn parse(name: &str) -> Option<Self> {
        match name {
            "f32" | "float32" => Some(WeightFormat::F32),
            "f16" | "float16" => Some(WeightFormat::F16),
            "bf16" | "bfloat16" => Some(WeightFormat::Bf16),
            "q8_0" => Some(WeightFormat::Q8_0),
            "q4_0" => Some(WeightFormat::Q4_0),
            "q5_0" => Some(WeightFormat::Q5_0),
            "q4_k" => Some(WeightFormat::Q4K),
            "q6_k" => Some(WeightFormat::Q6K),
            _ => None,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            WeightFormat::F32 => "f32",
            WeightFormat::F16 => "f16",
            WeightFormat::Bf16 => "bf16",
            WeightFormat::Q8_0 => "q8_0",
            WeightFormat::Q4_0 => "q4_0",
            WeightFormat::Q5_0 => "q5_0",
            WeightFormat::Q4K => "q4_k",
            WeightFormat::Q6K => "q6_k",
        }
    }

    /// (weights, bytes) of one block: a single element for the plain formats.
    pub fn block(self) -> (usize, usize) {
        match self {
            WeightFormat::F32 => (1, 4),
            WeightFormat::F16 | WeightFormat::Bf16 => (1, 2),
            block => with_block_format!(block, F => (F::WEIGHTS, F::BYTES)),
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

/// Bytes a checkpoint's tensors live in: a mapped file, or an owned buffer (tensors whose rows
/// the loader had to reorder).
pub type SharedBytes = Arc<dyn AsRef<[u8]> + Send + Sync>;

/// One tensor of a checkpoint as it sits in a mapped file: its stored dtype, its shape and
/// its byte range (checked against the file by the checkpoint reader). Backends upload from
/// it; the CPU backend may keep a zero-copy view of the mapping.
#[derive(Clone)]
pub struct HostTensor<'a> {
    pub name: &'a str,
    pub dtype: DType,
    pub shape: &'a [usize],
    pub map: &'a SharedBytes,
    /// Byte range within `map`.
    pub start: usize,
    pub end: usize,
}

impl HostTensor<'_> {
    pub fn bytes(&self) -> &[u8] {
        &(**self.map).as_ref()[self.start..self.end]
    }

    pub fn elements(&self) -> usize {
        self.shape.iter().product()
    }

    /// Whether the data may be viewed in place as `format`: the same dtype, aligned for it
    /// (block formats are read byte by byte: any alignment).
    pub fn viewable_as(&self, format: WeightFormat) -> bool {
        let align = if format.is_plain() { format.block().1 } else { 1 };
        self.dtype == format && (self.bytes().as_ptr() as usize) % align == 0
    }

    /// All elements as f32, read byte by byte (the data may sit at any alignment).
    pub fn to_f32(&self) -> Vec<f32> {
        let bytes = self.bytes();
        use rayon::prelude::*;
        // On every core: large checkpoints convert before they are quantized.
        match self.dtype {
            DType::F32 => bytes.par_chunks_exact(4).map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]])).collect(),
            DType::F16 => bytes.par_chunks_exact(2).map(|b| f16::from_le_bytes([b[0], b[1]]).to_f32()).collect(),
            DType::Bf16 => bytes.par_chunks_exact(2).map(|b| bf16::from_le_bytes([b[0], b[1]]).to_f32()).collect(),
            block => with_block_format!(block, F => quant::dequantize::<F>(bytes)),
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
            block => with_block_format!(block, F => quant::quantize::<F>(&values)),
        }
    }
}
