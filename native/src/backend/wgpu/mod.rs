//! The GPU backend through wgpu: WGSL kernels (`shaders/`) on Metal (macOS) or Vulkan (Linux).
//!
//! Weights are uploaded once in their held format (f32, f16, bf16 or a block format; arithmetic is f32) and
//! split by rows into several buffers when larger than one storage binding. A forward step
//! records one compute pass and is submitted once, at the read of its logits.

mod device;
pub mod kernels;
mod recorder;

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use self::device::Gpu;
pub use self::device::ADAPTER_ENV;
use self::kernels::{KernelId, Kernels, ShaderChecks, Tiles};
pub use self::recorder::Profile;
use self::recorder::{grid, storage_usage, GBuf, Recorder};
use super::{AttentionShape, Backend, CacheShape, StepInput};
use crate::error::{EngineError, Result};
use crate::backend::Activation;
use crate::tensor::{HostTensor, WeightFormat};

/// Lowers the largest buffer a weight matrix is held in (bytes), to exercise splitting with
/// small models in tests.
pub const MAX_WEIGHT_BUFFER_ENV: &str = "UPG_BATCH_GPU_MAX_WEIGHT_BUFFER";
/// Parameter slots per step: far above what any model records (about 8-15 per layer).
const MAX_DISPATCHES: usize = 8192;
const WG: u32 = 64;
const MAX_HEAD_DIM: usize = 256;

/// A weight matrix (rows, cols), split by rows into buffers that each fit one binding.
pub struct GMatrix {
    chunks: Vec<(Arc<GBuf>, u32, u32)>, // (buffer, first row, rows)
    rows: usize,
    cols: usize,
    format: WeightFormat,
}

pub struct GAct {
    buf: Arc<GBuf>,
    width: usize,
}

pub struct GCache {
    k: Vec<Arc<GBuf>>, // per layer (slots, context, kv_dim), f32 or f16
    v: Vec<Arc<GBuf>>,
    shape: CacheShape,
}

pub struct GStep {
    n: usize,
    m: usize,
    rows: Arc<GBuf>,
    rope: Arc<GBuf>,
    logit_rows: Arc<GBuf>,
}

#[derive(Default)]
struct StepBuffers {
    rows: Option<Arc<GBuf>>,
    rope: Option<Arc<GBuf>>,
    logit_rows: Option<Arc<GBuf>>,
}

pub struct WgpuBackend {
    gpu: Gpu,
    kernels: Kernels,
    rec: Mutex<Recorder>,
    step_buffers: Mutex<StepBuffers>,
    /// Stand-ins for bindings an op does not use: one read-only, two writable.
    dummy: [Arc<GBuf>; 3],
    max_binding: u64,
    /// Largest buffer of one weight matrix chunk (max_binding unless lowered for tests).
    max_weight_buffer: u64,
    cache_pool: Mutex<Option<Arc<GCache>>>,
    last_dispatches: AtomicUsize,
    tiles: Tiles,
    /// The KV cache holds f16 (half the memory) rather than f32.
    pub kv_f16: bool,
}

fn u32s(values: &[u32]) -> Vec<u8> {
    bytemuck::cast_slice(values).to_vec()
}

fn gpu_error(message: impl Into<String>) -> EngineError {
    EngineError::Backend("gpu".into(), message.into())
}

impl WgpuBackend {
    /// Opens the GPU. `hardware_only`: refuse software adapters even when forced (the `auto`
    /// backend never runs on a software driver).
    pub fn new(hardware_only: bool) -> Result<Self> {
        let checks = ShaderChecks::from_env().map_err(gpu_error)?;
        let gpu = device::open()?;
        if hardware_only && gpu.is_software() {
            return Err(gpu_error(format!("{} is a software adapter", gpu.name())));
        }
        let max_binding = (gpu.limits.max_storage_buffer_binding_size as u64).min(gpu.limits.max_buffer_size);
        let max_weight_buffer = match std::env::var(MAX_WEIGHT_BUFFER_ENV).ok().and_then(|v| v.parse::<u64>().ok()) {
            Some(v) => max_binding.min(v.max(16)),
            None => max_binding,
        };
        let rec = Mutex::new(Recorder::new(&gpu, MAX_DISPATCHES));
        let dummy = [0, 1, 2].map(|i| GBuf::new(&gpu, &format!("unused binding {i}"), 16, storage_usage()));
        Ok(WgpuBackend {
            gpu,
            kernels: Kernels::new(checks),
            rec,
            step_buffers: Mutex::default(),
            dummy,
            max_binding,
            max_weight_buffer,
            cache_pool: Mutex::new(None),
            last_dispatches: AtomicUsize::new(0),
            tiles: Tiles::from_env(),
            kv_f16: false,
        })
    }

    fn kv_element_bytes(&self) -> usize {
        if self.kv_f16 {
            2
        } else {
            4
        }
    }

    /// What wgpu compiled into the kernels: `bounds` (default), `all` or `none`.
    pub fn shader_checks(&self) -> &'static str {
        self.kernels.checks().name()
    }

    pub fn adapter_name(&self) -> String {
        self.gpu.name()
    }

    pub fn api(&self) -> &'static str {
        self.gpu.api()
    }

    /// "discrete", "integrated", "virtual", "cpu" (a software driver) or "other".
    pub fn device_type(&self) -> &'static str {
        match self.gpu.info.device_type {
            ::wgpu::DeviceType::DiscreteGpu => "discrete",
            ::wgpu::DeviceType::IntegratedGpu => "integrated",
            ::wgpu::DeviceType::VirtualGpu => "virtual",
            ::wgpu::DeviceType::Cpu => "cpu",
            ::wgpu::DeviceType::Other => "other",
        }
    }

    /// Buffers the weights of one matrix occupy (more than one when split over bindings).
    pub fn matrix_chunks(m: &GMatrix) -> usize {
        m.chunks.len()
    }

    /// Dispatches recorded by the last step (a decode step's count does not depend on its rows).
    pub fn dispatches_last_step(&self) -> usize {
        self.last_dispatches.load(Ordering::Relaxed)
    }

    /// Streaming read bandwidth of the device in bytes/s: `repeats` reads of a buffer of up to
    /// `bytes` (capped at one binding) in one pass, timed by timestamps where the adapter has
    /// them, else by the wall clock around submit and wait.
    pub fn read_bandwidth(&self, bytes: u64, repeats: u32) -> Result<f64> {
        let size = bytes.min(self.max_binding) / 16 * 16;
        let data = self.buffer("bandwidth probe", size)?;
        let out = self.buffer("bandwidth probe output", 16)?;
        let count = (size / 16) as u32;
        let threads = 256 * 1024u32.min(count.div_ceil(256)).max(1) * 4;
        let (gx, gy) = grid(threads / 256);
        let params = u32s(&[count, gx * gy * 256]);
        let run = |n: u32| -> Result<(f64, Profile)> {
            let before = self.profile();
            let t = std::time::Instant::now();
            for _ in 0..n {
                self.dispatch(KernelId::Bandwidth, &params, &[&data, &out], (gx, gy, 1));
            }
            self.rec().submit_and_read(&self.gpu, &out, 4)?;
            let after = self.profile();
            Ok((t.elapsed().as_secs_f64(), Profile { gpu_s: after.gpu_s - before.gpu_s, ..after }))
        };
        run(1)?; // warm up: compile, first touch
        let (wall, p) = run(repeats.max(1))?;
        let seconds = if p.has_timestamps && p.gpu_s > 0.0 { p.gpu_s } else { wall };
        Ok(size as f64 * repeats.max(1) as f64 / seconds)
    }

    /// Totals of recorded and submitted steps (for benchmarks).
    pub fn profile(&self) -> Profile {
        self.rec().profile
    }

    /// GPU seconds per kernel (see `Recorder::kernel_totals`).
    pub fn kernel_times(&self) -> Vec<(String, u64, f64)> {
        self.rec().kernel_totals()
    }

    fn rec(&self) -> MutexGuard<'_, Recorder> {
        self.rec.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn dispatch(&self, id: KernelId, params: &[u8], buffers: &[&GBuf], groups: (u32, u32, u32)) {
        let kernel = self.kernels.get(&self.gpu.device, id);
        self.rec().dispatch(&self.gpu, &kernel, params, buffers, groups);
    }

    /// A storage buffer of `bytes`, or an error naming what does not fit one binding.
    fn buffer(&self, what: &str, bytes: u64) -> Result<Arc<GBuf>> {
        if bytes > self.max_binding {
            return Err(gpu_error(format!(
                "{what} needs {} MiB in one buffer, above this adapter's largest storage binding ({} MiB)",
                bytes >> 20,
                self.max_binding >> 20
            )));
        }
        self.rec().clear_bind_groups();
        Ok(GBuf::new(&self.gpu, what, bytes, storage_usage()))
    }

    /// Writes `bytes` into the step buffer in `slot`, growing it when too small.
    fn step_upload(&self, slot: &mut Option<Arc<GBuf>>, what: &str, bytes: &[u8]) -> Result<Arc<GBuf>> {
        if slot.as_ref().is_none_or(|b| b.size < bytes.len() as u64) {
            *slot = Some(self.buffer(what, (bytes.len() as u64).next_power_of_two())?);
        }
        let buf = slot.clone().expect("step buffer allocated above");
        if !bytes.is_empty() {
            self.gpu.queue.write_buffer(&buf.buf, 0, bytes);
        }
        Ok(buf)
    }

    /// y (n, ld)[..] (+)= norm?(x) @ W^T (+ bias), or silu(x W^T) * (x U^T) with `up`.
    #[allow(clippy::too_many_arguments)]
    fn matmul_op(&self, n: usize, w: &GMatrix, up: Option<&GMatrix>, bias: Option<&GBuf>, norm: Option<(&GBuf, f64)>, accumulate: bool, x: &GAct, y: &GAct) {
        if n == 0 {
            return;
        }
        debug_assert_eq!(x.width, w.cols);
        let flags = bias.map_or(0, |_| 1) | if accumulate { 2 } else { 0 } | norm.map_or(0, |_| 4);
        let eps = norm.map_or(0.0, |(_, e)| e as f32);
        let tile = self.tiles.for_batch(n, up.is_some());
        let tiles = (n as u32).div_ceil(tile.1);
        let id = KernelId::Matmul { format: w.format, gated: up.is_some(), tile, qkv: false };
        for (c, (buf, first, rows)) in w.chunks.iter().enumerate() {
            let blocks = rows.div_ceil(tile.0);
            let (gx, gy) = grid((blocks * tiles).div_ceil(tile.2));
            let params = u32s(&[n as u32, *rows, w.cols as u32, flags, *first, y.width as u32, gx, eps.to_bits(), tiles, blocks, 0, 0]);
            let u = up.map_or(buf.as_ref(), |u| u.chunks[c].0.as_ref());
            let buffers = [buf.as_ref(), x.buf.as_ref(), y.buf.as_ref(), bias.unwrap_or(&self.dummy[0]), norm.map_or(self.dummy[0].as_ref(), |(g, _)| g), u];
            self.dispatch(id, &params, &buffers, (gx, gy, 1));
        }
    }

    /// q, k, v = rmsnorm(x) @ {Wq, Wk, Wv}^T (+ biases) in one dispatch, where the three fit
    /// (one chunk each, k and v of one shape, one format, the adapter's bindings); otherwise
    /// one dispatch each. Either way each element is summed in the same order.
    fn norm_qkv_op(&self, n: usize, x: &GAct, norm: (&GBuf, f64), w: [&GMatrix; 3], bias: [Option<&Arc<GBuf>>; 3], out: [&GAct; 3]) {
        let one = w.iter().all(|m| m.chunks.len() == 1 && m.format == w[0].format && m.cols == w[0].cols)
            && w[1].rows == w[2].rows
            && out[1].width == out[2].width
            && bias.iter().all(|b| b.is_some() == bias[0].is_some())
            && self.gpu.limits.max_storage_buffers_per_shader_stage >= 11;
        if !one {
            for i in 0..3 {
                self.matmul_op(n, w[i], None, bias[i].map(|b| b.as_ref()), Some(norm), false, x, out[i]);
            }
            return;
        }
        if n == 0 {
            return;
        }
        let tile = self.tiles.for_batch(n, false);
        let tiles = (n as u32).div_ceil(tile.1);
        let (rows0, rows1) = (w[0].rows as u32, w[1].rows as u32);
        let blocks0 = rows0.div_ceil(tile.0);
        let (gx, gy) = grid(((blocks0 + 2 * rows1.div_ceil(tile.0)) * tiles).div_ceil(tile.2));
        let flags = bias[0].map_or(0, |_| 1) | 4;
        let params = u32s(&[
            n as u32,
            rows0,
            w[0].cols as u32,
            flags,
            0,
            out[0].width as u32,
            gx,
            (norm.1 as f32).to_bits(),
            tiles,
            blocks0,
            rows1,
            out[1].width as u32,
        ]);
        let b = |i: usize| bias[i].map_or(self.dummy[0].as_ref(), |b| b.as_ref());
        let buffers = [
            w[0].chunks[0].0.as_ref(),
            x.buf.as_ref(),
            out[0].buf.as_ref(),
            b(0),
            norm.0,
            w[1].chunks[0].0.as_ref(),
            w[2].chunks[0].0.as_ref(),
            out[1].buf.as_ref(),
            out[2].buf.as_ref(),
            b(1),
            b(2),
        ];
        self.dispatch(KernelId::Matmul { format: w[0].format, gated: false, tile, qkv: true }, &params, &buffers, (gx, gy, 1));
    }

    #[allow(clippy::too_many_arguments)]
    /// `rotate`: the rotary table to rotate q and k with, or None for only the KV write.
    fn rope_kv_op(&self, step: &GStep, q: &GBuf, k: &GBuf, v: &GBuf, caches: Option<(&GCache, usize)>, rotate: Option<usize>, heads: (usize, usize), head_dim: usize) {
        let (qh, kvh) = heads;
        let threads = (step.n * (qh + kvh) * head_dim / 4) as u32;
        let (gx, gy) = grid(threads.div_ceil(WG));
        let (kc, vc, context) = match caches {
            Some((c, l)) => (c.k[l].as_ref(), c.v[l].as_ref(), c.shape.context),
            None => (self.dummy[1].as_ref(), self.dummy[2].as_ref(), 0),
        };
        let params = u32s(&[step.n as u32, qh as u32, kvh as u32, head_dim as u32, caches.is_some() as u32, context as u32, gx * WG, rotate.map_or(0, |t| t as u32 + 1)]);
        let buffers = [q, k, v, step.rope.as_ref(), step.rows.as_ref(), kc, vc];
        self.dispatch(KernelId::RopeKv(self.kv_f16), &params, &buffers, (gx, gy, 1));
    }

    fn elementwise(&self, count: usize, op: u32, a: &GAct, b: &GBuf, s: f32) {
        let (gx, gy) = grid((count as u32).div_ceil(WG));
        self.dispatch(KernelId::Elementwise, &u32s(&[count as u32, op, gx * WG, s.to_bits()]), &[&a.buf, b], (gx, gy, 1));
    }

    /// `x`: the input rows (n, width), or None to norm `out`'s rows in place.
    #[allow(clippy::too_many_arguments)]
    fn rmsnorm_op(&self, n: usize, width: usize, x: Option<&GBuf>, w: &GBuf, eps: f64, out: &GBuf, gather: Option<&GBuf>) {
        if n == 0 {
            return;
        }
        let (gx, gy) = grid(n as u32);
        let params = u32s(&[n as u32, width as u32, gather.is_some() as u32, x.is_none() as u32, (eps as f32).to_bits(), gx]);
        let buffers = [x.unwrap_or(&self.dummy[1]), out, w, gather.unwrap_or(&self.dummy[0])];
        self.dispatch(KernelId::RmsNorm, &params, &buffers, (gx, gy, 1));
    }
}

impl Backend for WgpuBackend {
    type Matrix = GMatrix;
    type Vector = Arc<GBuf>;
    type Act = GAct;
    type Cache = Arc<GCache>;
    type Step = GStep;

    fn describe(&self) -> String {
        format!("gpu ({}, {})", self.gpu.name(), self.gpu.api())
    }

    fn upload_matrix(&self, t: &HostTensor<'_>, rows: usize, cols: usize, format: WeightFormat) -> Result<GMatrix> {
        if cols % 4 != 0 {
            return Err(EngineError::tensor("", t.name, format!("rows of {cols} elements: the GPU backend needs a multiple of 4")));
        }
        if format != WeightFormat::F32 && format != WeightFormat::Bf16 && !self.gpu.f16_in_f32 {
            return Err(gpu_error(format!("{} cannot unpack f16 in shaders (no SHADER_F16_IN_F32); use weights=\"f32\" or \"bf16\"", self.gpu.name())));
        }
        let row_bytes = format.row_bytes(cols) as u64;
        // Buffers are padded to 16 bytes (GBuf), which must stay within the binding limit.
        let rows_per_chunk = ((self.max_weight_buffer / 16 * 16) / row_bytes).min(u32::MAX as u64) as usize;
        if rows_per_chunk == 0 {
            return Err(EngineError::tensor("", t.name, "one row is larger than this adapter's largest storage binding"));
        }
        let bytes = t.to_format_bytes(format);
        let mut chunks = Vec::new();
        for first in (0..rows).step_by(rows_per_chunk) {
            let count = rows_per_chunk.min(rows - first);
            let data = &bytes[first * row_bytes as usize..(first + count) * row_bytes as usize];
            chunks.push((GBuf::with_data(&self.gpu, t.name, data), first as u32, count as u32));
        }
        Ok(GMatrix { chunks, rows, cols, format })
    }

    fn upload_vector(&self, values: &[f32]) -> Result<Arc<GBuf>> {
        Ok(GBuf::with_data(&self.gpu, "vector", bytemuck::cast_slice(values)))
    }

    fn matrix_bytes(&self, m: &GMatrix) -> usize {
        m.rows * m.format.row_bytes(m.cols)
    }

    fn activation(&self, rows: usize, width: usize) -> Result<GAct> {
        let buf = self.buffer(&format!("activations ({rows} x {width})"), (rows * width * 4) as u64)?;
        Ok(GAct { buf, width })
    }

    fn new_cache(&self, shape: CacheShape) -> Result<Arc<GCache>> {
        let mut pool = self.cache_pool.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(c) = pool.as_ref() {
            let s = c.shape;
            if s.layers == shape.layers && s.kv_dim == shape.kv_dim && s.slots >= shape.slots && s.context >= shape.context {
                return Ok(c.clone());
            }
        }
        *pool = None; // free the old cache before allocating the new one
        let bytes = (shape.slots * shape.context * shape.kv_dim * self.kv_element_bytes()) as u64;
        let what = format!("the KV cache of one layer ({} sequences x {} positions; lower max_batch or context)", shape.slots, shape.context);
        let mut k = Vec::with_capacity(shape.layers);
        let mut v = Vec::with_capacity(shape.layers);
        for _ in 0..shape.layers {
            k.push(self.buffer(&what, bytes)?);
            v.push(self.buffer(&what, bytes)?);
        }
        let cache = Arc::new(GCache { k, v, shape });
        *pool = Some(cache.clone());
        Ok(cache)
    }

    fn cache_token_bytes(&self, layers: usize, kv_dim: usize) -> usize {
        layers * 2 * kv_dim * self.kv_element_bytes()
    }

    fn cache_reserve(&self, _cache: &mut Arc<GCache>, _slot: usize, _positions: usize) {}

    fn cache_reset(&self, _cache: &mut Arc<GCache>, _slot: usize) {}

    fn cache_bytes(&self, cache: &Arc<GCache>) -> usize {
        cache.k.iter().chain(&cache.v).map(|b| b.size as usize).sum()
    }

    fn cache_preallocated(&self) -> bool {
        true
    }

    fn begin_step(&self, input: &StepInput<'_>) -> Result<GStep> {
        self.rec().reset();
        let rows: Vec<u32> = input.rows.iter().flat_map(|r| [r.slot as u32, r.pos as u32, r.token, 0]).collect();
        let logit_rows: Vec<u32> = input.logit_rows.iter().map(|&i| i as u32).collect();
        let mut bufs = self.step_buffers.lock().unwrap_or_else(|e| e.into_inner());
        let rows = self.step_upload(&mut bufs.rows, "step rows", &u32s(&rows))?;
        let rope = self.step_upload(&mut bufs.rope, "step rotary table", bytemuck::cast_slice(input.rope))?;
        let logit_rows = self.step_upload(&mut bufs.logit_rows, "step logit rows", &u32s(&logit_rows))?;
        Ok(GStep { n: input.rows.len(), m: input.logit_rows.len(), rows, rope, logit_rows })
    }

    fn embed(&self, step: &GStep, table: &GMatrix, x: &mut GAct) {
        let h4 = (x.width / 4) as u32;
        let (gx, gy) = grid((step.n as u32 * h4).div_ceil(WG));
        for (buf, first, rows) in &table.chunks {
            let params = u32s(&[step.n as u32, x.width as u32, *first, *rows, gx * WG]);
            self.dispatch(KernelId::Embed(table.format), &params, &[buf, &x.buf, &step.rows], (gx, gy, 1));
        }
    }

    fn rmsnorm(&self, n: usize, x: &GAct, w: &Arc<GBuf>, eps: f64, out: &mut GAct) {
        self.rmsnorm_op(n, x.width, Some(&x.buf), w, eps, &out.buf, None);
    }

    fn matmul(&self, n: usize, w: &GMatrix, bias: Option<&Arc<GBuf>>, x: &GAct, out: &mut GAct) {
        self.matmul_op(n, w, None, bias.map(|b| b.as_ref()), None, false, x, out);
    }

    fn rope(&self, step: &GStep, table: usize, q: &mut GAct, k: &mut GAct, head_dim: usize) {
        let heads = (q.width / head_dim, k.width / head_dim);
        self.rope_kv_op(step, &q.buf, &k.buf, &self.dummy[0], None, Some(table), heads, head_dim);
    }

    fn kv_write(&self, step: &GStep, cache: &mut Arc<GCache>, layer: usize, k: &GAct, v: &GAct) {
        // Without rotation each thread copies one pair: the whole row may be one "head".
        self.rope_kv_op(step, &self.dummy[1], &k.buf, &v.buf, Some((cache, layer)), None, (0, 1), k.width);
    }

    fn attention(&self, step: &GStep, cache: &Arc<GCache>, layer: usize, shape: AttentionShape, q: &GAct, out: &mut GAct) {
        if step.n == 0 {
            return;
        }
        assert!(shape.head_dim <= MAX_HEAD_DIM, "head_dim checked at load");
        let params = u32s(&[
            step.n as u32,
            shape.heads as u32,
            shape.kv_heads as u32,
            shape.head_dim as u32,
            cache.shape.context as u32,
            shape.window.unwrap_or(0) as u32,
            shape.scale.to_bits(),
            0,
        ]);
        let buffers = [q.buf.as_ref(), &cache.k[layer], &cache.v[layer], &out.buf, &step.rows];
        self.dispatch(KernelId::Attention(self.kv_f16), &params, &buffers, (shape.heads as u32, step.n as u32, 1));
    }

    fn gated_act(&self, n: usize, act: Activation, gate: &mut GAct, up: &GAct) {
        let op = match act {
            Activation::Silu => 1,
            Activation::GeluTanh => 2,
        };
        self.elementwise(n * gate.width, op, gate, &up.buf, 0.0);
    }

    fn head_rmsnorm(&self, n: usize, x: &mut GAct, w: &Arc<GBuf>, eps: f64, head_dim: usize) {
        self.rmsnorm_op(n * x.width / head_dim, head_dim, None, w, eps, &x.buf, None);
    }

    fn scale(&self, n: usize, x: &mut GAct, s: f32) {
        self.elementwise(n * x.width, 3, x, &self.dummy[0], s);
    }

    fn add(&self, n: usize, x: &mut GAct, y: &GAct) {
        self.elementwise(n * x.width, 0, x, &y.buf, 0.0);
    }

    fn rmsnorm_logit_rows(&self, step: &GStep, x: &GAct, w: &Arc<GBuf>, eps: f64, out: &mut GAct) {
        self.rmsnorm_op(step.m, x.width, Some(&x.buf), w, eps, &out.buf, Some(&step.logit_rows));
    }

    fn write(&self, x: &mut GAct, values: &[f32]) -> Result<()> {
        if values.len() * 4 > x.buf.size as usize {
            return Err(gpu_error("write past the end of an activation buffer"));
        }
        self.gpu.queue.write_buffer(&x.buf.buf, 0, bytemuck::cast_slice(values));
        Ok(())
    }

    fn read(&self, n: usize, x: &GAct) -> Result<Vec<f32>> {
        let mut rec = self.rec();
        self.last_dispatches.store(rec.dispatches, Ordering::Relaxed);
        let bytes = rec.submit_and_read(&self.gpu, &x.buf, (n * x.width * 4) as u64)?;
        Ok(bytemuck::pod_collect_to_vec(&bytes[..n * x.width * 4]))
    }

    fn norm_matmul(&self, n: usize, x: &GAct, norm: &Arc<GBuf>, eps: f64, w: &GMatrix, bias: Option<&Arc<GBuf>>, _normed: &mut GAct, out: &mut GAct) {
        self.matmul_op(n, w, None, bias.map(|b| b.as_ref()), Some((norm, eps)), false, x, out);
    }

    fn matmul_add(&self, n: usize, w: &GMatrix, bias: Option<&Arc<GBuf>>, y: &GAct, _scratch: &mut GAct, x: &mut GAct) {
        self.matmul_op(n, w, None, bias.map(|b| b.as_ref()), None, true, y, x);
    }

    fn norm_qkv(
        &self,
        n: usize,
        x: &GAct,
        norm: &Arc<GBuf>,
        eps: f64,
        w: [&GMatrix; 3],
        bias: [Option<&Arc<GBuf>>; 3],
        _normed: &mut GAct,
        q: &mut GAct,
        k: &mut GAct,
        v: &mut GAct,
    ) {
        self.norm_qkv_op(n, x, (norm, eps), w, bias, [q, k, v]);
    }

    fn norm_gate_up(&self, n: usize, x: &GAct, norm: &Arc<GBuf>, eps: f64, gw: &GMatrix, uw: &GMatrix, _normed: &mut GAct, gate: &mut GAct, _up: &mut GAct) {
        self.matmul_op(n, gw, Some(uw), None, Some((norm, eps)), false, x, gate);
    }

    fn rope_kv_write(&self, step: &GStep, table: usize, cache: &mut Arc<GCache>, layer: usize, q: &mut GAct, k: &mut GAct, v: &GAct, head_dim: usize) {
        let heads = (q.width / head_dim, k.width / head_dim);
        self.rope_kv_op(step, &q.buf, &k.buf, &v.buf, Some((cache, layer)), Some(table), heads, head_dim);
    }
}

/// Checks that a model's shapes suit the GPU kernels, naming what does not.
pub fn check_shapes(head_dim: usize) -> Result<()> {
    if head_dim > MAX_HEAD_DIM {
        return Err(gpu_error(format!("head_dim {head_dim} is above the attention kernel's limit of {MAX_HEAD_DIM}")));
    }
    if head_dim % 4 != 0 {
        return Err(gpu_error(format!("head_dim {head_dim} is not a multiple of 4, which the GPU's RoPE and KV-cache kernels need")));
    }
    Ok(())
}
