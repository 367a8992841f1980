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
}

/// What a checkpoint file stores for one tensor. Today the same set as `WeightFormat`.
pub type DType = WeightFormat;

impl WeightFormat {
    pub fn parse(name: &str) -> Option<Self> {
        match name {
            "f32" | "float32" => Some(WeightFormat::F32),
            "f16" | "float16" => Some(WeightFormat::F16),
            "bf16" | "bfloat16" => Some(WeightFormat::Bf16),
            _ => None,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            WeightFormat::F32 => "f32",
            WeightFormat::F16 => "f16",
            WeightFormat::Bf16 => "bf16",
        }
    }

    pub fn bytes_per_element(self) -> usize {
        match self {
            WeightFormat::F32 => 4,
            WeightFormat::F16 | WeightFormat::Bf16 => 2,
        }
    }
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
        self.dtype == format && (self.map.as_ptr() as usize + self.start) % format.bytes_per_element() == 0
    }

    /// All elements as f32, read byte by byte (the data may sit at any alignment).
    pub fn to_f32(&self) -> Vec<f32> {
        let bytes = self.bytes();
        match self.dtype {
            DType::F32 => bytes.chunks_exact(4).map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]])).collect(),
            DType::F16 => bytes.chunks_exact(2).map(|b| f16::from_le_bytes([b[0], b[1]]).to_f32()).collect(),
            DType::Bf16 => bytes.chunks_exact(2).map(|b| bf16::from_le_bytes([b[0], b[1]]).to_f32()).collect(),
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
        }
    }
}
