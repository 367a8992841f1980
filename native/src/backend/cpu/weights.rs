//! How the CPU backend holds weight matrices. A matrix is either a zero-copy view into a
//! memory-mapped safetensors file (when the stored dtype is the requested one) or an owned,
//! converted copy. Kernels read it through `WeightView`; compressed formats slot in as new
//! variants of `WeightFormat` / `WeightView`.


use half::{bf16, f16};

use crate::quant::{self, BlockFormat};
use crate::tensor::{SharedBytes, WeightFormat};
use crate::with_block_format;

/// Borrowed weights, row-major.
#[derive(Clone, Copy)]
pub enum WeightView<'a> {
    F32(&'a [f32]),
    F16(&'a [f16]),
    Bf16(&'a [bf16]),
    /// Whole blocks of a block format (rows are whole blocks).
    Blocks(WeightFormat, &'a [u8]),
}

impl WeightView<'_> {
    /// Element `i` as f32.
    #[inline]
    pub fn get(&self, i: usize) -> f32 {
        match self {
            WeightView::F32(d) => d[i],
            WeightView::F16(d) => d[i].to_f32(),
            WeightView::Bf16(d) => d[i].to_f32(),
            WeightView::Blocks(f, d) => with_block_format!(*f, F => quant::weight::<F>(d, i)),
        }
    }

    /// Number of weights.
    pub fn len(&self) -> usize {
        match self {
            WeightView::F32(d) => d.len(),
            WeightView::F16(d) => d.len(),
            WeightView::Bf16(d) => d.len(),
            WeightView::Blocks(f, d) => with_block_format!(*f, F => d.len() / F::BYTES * F::WEIGHTS),
        }
    }

    /// Elements `start..start + out.len()` converted into `out`.
    pub fn copy_to_f32(&self, start: usize, out: &mut [f32]) {
        let end = start + out.len();
        match self {
            WeightView::F32(d) => out.copy_from_slice(&d[start..end]),
            WeightView::F16(d) => {
                use half::slice::HalfFloatSliceExt;
                d[start..end].convert_to_f32_slice(out)
            }
            WeightView::Bf16(d) => {
                use half::slice::HalfFloatSliceExt;
                d[start..end].convert_to_f32_slice(out)
            }
            WeightView::Blocks(f, d) => with_block_format!(*f, F => {
                // Whole blocks around the range, decoded once.
                let first = start / F::WEIGHTS;
                let last = end.div_ceil(F::WEIGHTS);
                let values = quant::dequantize::<F>(&d[first * F::BYTES..last * F::BYTES]);
                out.copy_from_slice(&values[start - first * F::WEIGHTS..end - first * F::WEIGHTS]);
            }),
        }
    }
}

enum Storage {
    Mapped { map: SharedBytes, offset: usize, len: usize },
    F32(Vec<f32>),
    F16(Vec<f16>),
    Bf16(Vec<bf16>),
    Blocks(Vec<u8>),
}

/// A weight matrix W (rows, cols), row-major: a Linear layer's `weight` is (out, in).
pub struct Matrix {
    pub rows: usize,
    pub cols: usize,
    pub format: WeightFormat,
    storage: Storage,
}

impl Matrix {
    /// A view into a mapped file; the caller has checked bounds, size and alignment.
    pub fn mapped(rows: usize, cols: usize, format: WeightFormat, map: SharedBytes, offset: usize) -> Self {
        let len = rows * format.row_bytes(cols);
        debug_assert!(offset + len <= (*map).as_ref().len());
        Matrix { rows, cols, format, storage: Storage::Mapped { map, offset, len } }
    }

    /// An owned matrix in `format`, converted from f32 values.
    pub fn from_f32(rows: usize, cols: usize, format: WeightFormat, values: Vec<f32>) -> Self {
        assert_eq!(values.len(), rows * cols);
        let storage = match format {
            WeightFormat::F32 => Storage::F32(values),
            WeightFormat::F16 => Storage::F16(values.iter().map(|&x| f16::from_f32(x)).collect()),
            WeightFormat::Bf16 => Storage::Bf16(values.iter().map(|&x| bf16::from_f32(x)).collect()),
            block => Storage::Blocks(with_block_format!(block, F => quant::quantize::<F>(&values))),
        };
        Matrix { rows, cols, format, storage }
    }

    pub fn view(&self) -> WeightView<'_> {
        match &self.storage {
            Storage::Mapped { map, offset, len } => {
                let bytes = &(**map).as_ref()[*offset..*offset + *len];
                match self.format {
                    WeightFormat::F32 => WeightView::F32(bytemuck::cast_slice(bytes)),
                    WeightFormat::F16 => WeightView::F16(bytemuck::cast_slice(bytes)),
                    WeightFormat::Bf16 => WeightView::Bf16(bytemuck::cast_slice(bytes)),
                    block => WeightView::Blocks(block, bytes),
                }
            }
            Storage::F32(v) => WeightView::F32(v),
            Storage::F16(v) => WeightView::F16(v),
            Storage::Bf16(v) => WeightView::Bf16(v),
            Storage::Blocks(v) => WeightView::Blocks(self.format, v),
        }
    }

    pub fn byte_size(&self) -> usize {
        self.rows * self.format.row_bytes(self.cols)
    }

    pub fn is_mapped(&self) -> bool {
        matches!(self.storage, Storage::Mapped { .. })
    }

    /// Row `r` converted to f32 into `out` (len cols): an embedding lookup.
    pub fn row_to_f32(&self, r: usize, out: &mut [f32]) {
        self.view().copy_to_f32(r * self.cols, out)
    }
}
