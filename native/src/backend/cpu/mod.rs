//! The CPU backend: SIMD matrix products (AVX2/FMA/F16C where the processor has them, plain
//! Rust elsewhere) and row-wise kernels, multi-threaded with rayon (the caller's pool).

pub mod attention;
pub mod kv_cache;
pub mod matmul;
pub mod membench;
pub mod ops;
pub mod weights;

use rayon::prelude::*;

use self::attention::{attend_head, Scratch};
use self::kv_cache::SeqCache;
use self::matmul::{matmul_with, BlockActs};
use self::ops::{gelu_tanh_mul, rmsnorm, rope_apply, silu_mul};
use self::weights::Matrix;
use super::{AttentionShape, Backend, CacheShape, StepInput, StepRow};
use crate::error::Result;
use crate::backend::Activation;
use crate::tensor::{HostTensor, WeightFormat};

/// `acts`: how products with block-format weights take the activations; `kv_f16`: the KV
/// cache holds f16 (half the memory) instead of f32.
#[derive(Default)]
pub struct CpuBackend {
    pub acts: BlockActs,
    pub kv_f16: bool,
}

/// An activation buffer: up to `capacity` rows of `width` f32s.
pub struct CpuAct {
    pub data: Vec<f32>,
    pub width: usize,
}

impl CpuAct {
    fn rows(&self, n: usize) -> &[f32] {
        &self.data[..n * self.width]
    }

    fn rows_mut(&mut self, n: usize) -> &mut [f32] {
        &mut self.data[..n * self.width]
    }
}

pub struct CpuStep {
    rows: Vec<StepRow>,
    /// (rows, head_dim): cos then sin per row.
    rope: Vec<f32>,
    logit_rows: Vec<usize>,
}

impl Backend for CpuBackend {
    type Matrix = Matrix;
    type Vector = Vec<f32>;
    type Act = CpuAct;
    type Cache = Vec<SeqCache>;
    type Step = CpuStep;

    fn describe(&self) -> String {
        let acts = match self.acts {
            BlockActs::Int8 => "",
            BlockActs::F32 => ", f32 activations",
        };
        let kv = if self.kv_f16 { ", f16 kv cache" } else { "" };
        format!("cpu ({}{acts}{kv})", matmul::simd_name())
    }

    fn upload_matrix(&self, t: &HostTensor<'_>, rows: usize, cols: usize, format: WeightFormat) -> Result<Matrix> {
        if t.viewable_as(format) {
            return Ok(Matrix::mapped(rows, cols, format, t.map.clone(), t.start));
        }
        Ok(Matrix::from_f32(rows, cols, format, t.to_f32()))
    }

    fn upload_vector(&self, values: &[f32]) -> Result<Vec<f32>> {
        Ok(values.to_vec())
    }

    fn matrix_bytes(&self, m: &Matrix) -> usize {
        m.byte_size()
    }

    fn activation(&self, rows: usize, width: usize) -> Result<CpuAct> {
        Ok(CpuAct { data: vec![0.0; rows * width], width })
    }

    fn new_cache(&self, shape: CacheShape) -> Result<Vec<SeqCache>> {
        Ok((0..shape.slots).map(|_| SeqCache::new(shape.layers, shape.kv_dim, self.kv_f16)).collect())
    }

    fn cache_reserve(&self, cache: &mut Vec<SeqCache>, slot: usize, positions: usize) {
        cache[slot].reserve(positions);
    }

    fn cache_reset(&self, cache: &mut Vec<SeqCache>, slot: usize) {
        cache[slot].reset();
    }

    fn cache_bytes(&self, cache: &Vec<SeqCache>) -> usize {
        cache.iter().map(|c| c.bytes()).sum()
    }

    fn cache_token_bytes(&self, layers: usize, kv_dim: usize) -> usize {
        layers * 2 * kv_dim * if self.kv_f16 { 2 } else { 4 }
    }

    fn begin_step(&self, input: &StepInput<'_>) -> Result<CpuStep> {
        Ok(CpuStep { rows: input.rows.to_vec(), rope: input.rope.to_vec(), logit_rows: input.logit_rows.to_vec() })
    }

    fn embed(&self, step: &CpuStep, table: &Matrix, x: &mut CpuAct) {
        let h = x.width;
        for (i, r) in step.rows.iter().enumerate() {
            table.row_to_f32(r.token as usize, &mut x.data[i * h..(i + 1) * h]);
        }
    }

    fn rmsnorm(&self, n: usize, x: &CpuAct, w: &Vec<f32>, eps: f64, out: &mut CpuAct) {
        let width = w.len();
        out.rows_mut(n).par_chunks_mut(width).zip(x.rows(n).par_chunks(width)).for_each(|(o, xr)| rmsnorm(xr, w, eps, o));
    }

    fn matmul(&self, n: usize, w: &Matrix, bias: Option<&Vec<f32>>, x: &CpuAct, out: &mut CpuAct) {
        let out = out.rows_mut(n);
        matmul_with(self.acts, w.view(), w.rows, w.cols, x.rows(n), n, out);
        if let Some(b) = bias {
            for row in out.chunks_exact_mut(b.len()) {
                row.iter_mut().zip(b).for_each(|(o, &bi)| *o += bi);
            }
        }
    }

    fn rope(&self, step: &CpuStep, table: usize, q: &mut CpuAct, k: &mut CpuAct, head_dim: usize) {
        let (qd, kvd) = (q.width, k.width);
        let n = step.rows.len();
        for i in 0..n {
            let row = table * n + i;
            let table = &step.rope[row * head_dim..(row + 1) * head_dim];
            let (cos, sin) = table.split_at(head_dim / 2);
            rope_apply(&mut q.data[i * qd..(i + 1) * qd], head_dim, cos, sin);
            rope_apply(&mut k.data[i * kvd..(i + 1) * kvd], head_dim, cos, sin);
        }
    }

    fn kv_write(&self, step: &CpuStep, cache: &mut Vec<SeqCache>, layer: usize, k: &CpuAct, v: &CpuAct) {
        let kvd = k.width;
        for (i, r) in step.rows.iter().enumerate() {
            let seq = &mut cache[r.slot];
            seq.grow_to(r.pos + 1);
            let (keys, values) = &mut seq.layers[layer];
            keys.write(r.pos * kvd, &k.data[i * kvd..(i + 1) * kvd]);
            values.write(r.pos * kvd, &v.data[i * kvd..(i + 1) * kvd]);
        }
    }

    fn attention(&self, step: &CpuStep, cache: &Vec<SeqCache>, layer: usize, shape: AttentionShape, q: &CpuAct, out: &mut CpuAct) {
        let AttentionShape { heads, kv_heads, head_dim: hd, window, scale } = shape;
        let (qd, kvd) = (heads * hd, kv_heads * hd);
        let group = heads / kv_heads;
        let rows = &step.rows;
        let n = rows.len();
        out.rows_mut(n).par_chunks_mut(hd).enumerate().for_each_init(|| Scratch::new(hd), |scratch, (idx, o)| {
            let (i, head) = (idx / heads, idx % heads);
            let r = rows[i];
            let (keys, values) = &cache[r.slot].layers[layer];
            let first = window.map_or(0, |w| (r.pos + 1).saturating_sub(w));
            let qh = &q.data[i * qd + head * hd..i * qd + (head + 1) * hd];
            attend_head(qh, keys, values, kvd, (head / group) * hd, first, r.pos, scale, scratch, o);
        });
    }

    fn gated_act(&self, n: usize, act: Activation, gate: &mut CpuAct, up: &CpuAct) {
        let w = gate.width;
        let f = match act {
            Activation::Silu => silu_mul,
            Activation::GeluTanh => gelu_tanh_mul,
        };
        gate.rows_mut(n).par_chunks_mut(w).zip(up.rows(n).par_chunks(w)).for_each(|(g, u)| f(g, u));
    }

    fn head_rmsnorm(&self, n: usize, x: &mut CpuAct, w: &Vec<f32>, eps: f64, head_dim: usize) {
        x.rows_mut(n).par_chunks_mut(head_dim).for_each_init(
            || vec![0f32; head_dim],
            |tmp, head| {
                tmp.copy_from_slice(head);
                rmsnorm(tmp, w, eps, head);
            },
        );
    }

    fn scale(&self, n: usize, x: &mut CpuAct, s: f32) {
        x.rows_mut(n).iter_mut().for_each(|v| *v *= s);
    }

    fn add(&self, n: usize, x: &mut CpuAct, y: &CpuAct) {
        x.rows_mut(n).iter_mut().zip(y.rows(n)).for_each(|(a, b)| *a += b);
    }

    fn rmsnorm_logit_rows(&self, step: &CpuStep, x: &CpuAct, w: &Vec<f32>, eps: f64, out: &mut CpuAct) {
        let h = x.width;
        for (j, &i) in step.logit_rows.iter().enumerate() {
            rmsnorm(&x.data[i * h..(i + 1) * h], w, eps, &mut out.data[j * h..(j + 1) * h]);
        }
    }

    fn write(&self, x: &mut CpuAct, values: &[f32]) -> Result<()> {
        x.data[..values.len()].copy_from_slice(values);
        Ok(())
    }

    fn read(&self, n: usize, x: &CpuAct) -> Result<Vec<f32>> {
        Ok(x.rows(n).to_vec())
    }
}
