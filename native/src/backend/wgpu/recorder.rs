//! Recording a step: every op appends one dispatch to a single compute pass; its parameters
//! go to a slot of one uniform buffer (bound at a dynamic offset), so bind groups depend only
//! on buffers and are created once. A read ends the pass, copies the result to a staging
//! buffer, writes the parameters, submits once and waits.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Instant;

use super::device::Gpu;
use super::kernels::{Kernel, Slot, PARAMS_SLOT};
use crate::error::{EngineError, Result};

static NEXT_BUFFER_ID: AtomicU64 = AtomicU64::new(1);

/// A device buffer with an identity (bind groups are cached by the identities they bind).
pub struct GBuf {
    pub buf: ::wgpu::Buffer,
    pub id: u64,
    pub size: u64,
}

impl GBuf {
    pub fn new(gpu: &Gpu, label: &str, size: u64, usage: ::wgpu::BufferUsages) -> Arc<GBuf> {
        // 16 bytes: kernels bind some buffers as 16-byte words (f16 weights).
        let size = size.max(16).next_multiple_of(16);
        let buf = gpu.device.create_buffer(&::wgpu::BufferDescriptor { label: Some(label), size, usage, mapped_at_creation: false });
        Arc::new(GBuf { buf, id: NEXT_BUFFER_ID.fetch_add(1, Ordering::Relaxed), size })
    }

    /// A storage buffer holding `bytes` (padded to 16 bytes).
    pub fn with_data(gpu: &Gpu, label: &str, bytes: &[u8]) -> Arc<GBuf> {
        let size = (bytes.len() as u64).max(16).next_multiple_of(16);
        let buf = gpu.device.create_buffer(&::wgpu::BufferDescriptor {
            label: Some(label),
            size,
            usage: storage_usage(),
            mapped_at_creation: true,
        });
        buf.slice(..).get_mapped_range_mut()[..bytes.len()].copy_from_slice(bytes);
        buf.unmap();
        Arc::new(GBuf { buf, id: NEXT_BUFFER_ID.fetch_add(1, Ordering::Relaxed), size })
    }
}

pub fn storage_usage() -> ::wgpu::BufferUsages {
    ::wgpu::BufferUsages::STORAGE | ::wgpu::BufferUsages::COPY_SRC | ::wgpu::BufferUsages::COPY_DST
}

/// Workgroup counts for `groups` workgroups: x up to the per-dimension limit, the rest in y.
pub fn grid(groups: u32) -> (u32, u32) {
    const MAX: u32 = 65535;
    let x = groups.clamp(1, MAX);
    (x, groups.div_ceil(x).max(1))
}

pub struct Recorder {
    encoder: Option<::wgpu::CommandEncoder>,
    pass: Option<::wgpu::ComputePass<'static>>,
    params: Vec<u8>,
    params_buf: Arc<GBuf>,
    bind_groups: HashMap<Vec<u64>, ::wgpu::BindGroup>,
    staging: Option<Arc<GBuf>>,
    /// Dispatches recorded since the last submit.
    pub dispatches: usize,
    /// Timestamps at the beginning and end of the pass, where the adapter has them.
    timestamps: Option<Timestamps>,
    /// When the first dispatch of the step was recorded.
    first_dispatch: Option<Instant>,
    pub profile: Profile,
    /// With `UPG_BATCH_GPU_PROFILE_KERNELS=1` (benchmarks): each dispatch in its own timed pass.
    kernel_timing: Option<KernelTiming>,
}

/// GPU time per kernel: a pass per dispatch, timestamps at its beginning and end.
struct KernelTiming {
    set: ::wgpu::QuerySet,
    resolve: ::wgpu::Buffer,
    read: ::wgpu::Buffer,
    /// The kernel of each dispatch recorded since the last submit: its name and workgroups.
    recorded: Vec<String>,
    capacity: usize,
    /// Per kernel and workgroup count: dispatches and seconds.
    pub totals: HashMap<String, (u64, f64)>,
}

struct Timestamps {
    set: ::wgpu::QuerySet,
    resolve: ::wgpu::Buffer,
    read: ::wgpu::Buffer,
    period_ns: f64,
}

/// Totals over submitted steps: CPU time spent recording (first dispatch to submit), wall
/// time from the first dispatch to the results on the host, and GPU time of the pass
/// (timestamp queries; zero where the adapter has none).
#[derive(Default, Clone, Copy, Debug)]
pub struct Profile {
    pub steps: u64,
    pub dispatches: u64,
    pub encode_s: f64,
    pub wall_s: f64,
    pub gpu_s: f64,
    pub has_timestamps: bool,
}

impl Recorder {
    pub fn new(gpu: &Gpu, max_dispatches: usize) -> Self {
        let usage = ::wgpu::BufferUsages::UNIFORM | ::wgpu::BufferUsages::COPY_DST;
        let params_buf = GBuf::new(gpu, "params", max_dispatches as u64 * PARAMS_SLOT, usage);
        let timestamps = gpu.device.features().contains(::wgpu::Features::TIMESTAMP_QUERY).then(|| Timestamps {
            set: gpu.device.create_query_set(&::wgpu::QuerySetDescriptor { label: Some("pass time"), ty: ::wgpu::QueryType::Timestamp, count: 2 }),
            resolve: gpu.device.create_buffer(&::wgpu::BufferDescriptor {
                label: Some("pass time resolve"),
                size: 16,
                usage: ::wgpu::BufferUsages::QUERY_RESOLVE | ::wgpu::BufferUsages::COPY_SRC,
                mapped_at_creation: false,
            }),
            read: gpu.device.create_buffer(&::wgpu::BufferDescriptor {
                label: Some("pass time read"),
                size: 16,
                usage: ::wgpu::BufferUsages::MAP_READ | ::wgpu::BufferUsages::COPY_DST,
                mapped_at_creation: false,
            }),
            period_ns: gpu.queue.get_timestamp_period() as f64,
        });
        let profile = Profile { has_timestamps: timestamps.is_some(), ..Default::default() };
        let kernel_timing = (timestamps.is_some() && std::env::var("UPG_BATCH_GPU_PROFILE_KERNELS").is_ok_and(|v| v == "1")).then(|| {
            // wgpu allows 4096 queries a set: the first 2048 dispatches of a step are timed.
            let timed = max_dispatches.min(2048);
            let bytes = 16 * timed as u64;
            let buffer = |label, usage| gpu.device.create_buffer(&::wgpu::BufferDescriptor { label: Some(label), size: bytes, usage, mapped_at_creation: false });
            KernelTiming {
                set: gpu.device.create_query_set(&::wgpu::QuerySetDescriptor { label: Some("kernel time"), ty: ::wgpu::QueryType::Timestamp, count: 2 * timed as u32 }),
                resolve: buffer("kernel time resolve", ::wgpu::BufferUsages::QUERY_RESOLVE | ::wgpu::BufferUsages::COPY_SRC),
                read: buffer("kernel time read", ::wgpu::BufferUsages::MAP_READ | ::wgpu::BufferUsages::COPY_DST),
                recorded: Vec::new(),
                capacity: timed,
                totals: HashMap::new(),
            }
        });
        Recorder {
            encoder: None,
            pass: None,
            params: Vec::new(),
            params_buf,
            bind_groups: HashMap::new(),
            staging: None,
            dispatches: 0,
            timestamps,
            first_dispatch: None,
            profile,
            kernel_timing,
        }
    }

    /// Forget cached bind groups (after buffers they may hold were replaced).
    pub fn clear_bind_groups(&mut self) {
        self.bind_groups.clear();
    }

    /// Records one dispatch of `kernel` with `params` (at most PARAMS_SLOT bytes) over
    /// `buffers` (bindings 1.. in order) and `groups` workgroups.
    pub fn dispatch(&mut self, gpu: &Gpu, kernel: &Kernel, params: &[u8], buffers: &[&GBuf], groups: (u32, u32, u32)) {
        debug_assert_eq!(buffers.len() + 1, kernel.id.slots().len(), "{}: bindings", kernel.id.name());
        debug_assert!(params.len() as u64 <= PARAMS_SLOT);
        let offset = self.params.len() as u64;
        self.params.extend_from_slice(params);
        self.params.resize((offset + PARAMS_SLOT) as usize, 0);
        let mut key = Vec::with_capacity(buffers.len() + 2);
        key.push(kernel.index);
        key.push(self.params_buf.id);
        key.extend(buffers.iter().map(|b| b.id));
        if !self.bind_groups.contains_key(&key) {
            let mut entries = vec![::wgpu::BindGroupEntry {
                binding: 0,
                resource: ::wgpu::BindingResource::Buffer(::wgpu::BufferBinding {
                    buffer: &self.params_buf.buf,
                    offset: 0,
                    size: std::num::NonZeroU64::new(PARAMS_SLOT),
                }),
            }];
            for (i, b) in buffers.iter().enumerate() {
                debug_assert_ne!(kernel.id.slots()[i + 1], Slot::Params);
                entries.push(::wgpu::BindGroupEntry { binding: i as u32 + 1, resource: b.buf.as_entire_binding() });
            }
            let group = gpu.device.create_bind_group(&::wgpu::BindGroupDescriptor {
                label: None,
                layout: &kernel.layout,
                entries: &entries,
            });
            self.bind_groups.insert(key.clone(), group);
        }
        if let Some(k) = self.kernel_timing.as_mut() {
            if k.recorded.len() < k.capacity {
                self.pass = None; // each dispatch its own pass, timed below
                k.recorded.push(format!("{} {}x{}", kernel.id.name(), groups.0, groups.1));
            }
        }
        if self.pass.is_none() {
            self.first_dispatch.get_or_insert_with(Instant::now);
            let mut encoder = self.encoder.take().unwrap_or_else(|| gpu.device.create_command_encoder(&Default::default()));
            // Only the step's first pass is timed (a step records one pass), or each kernel's.
            let timestamp_writes = match &self.kernel_timing {
                Some(k) => Some(::wgpu::ComputePassTimestampWrites {
                    query_set: &k.set,
                    beginning_of_pass_write_index: Some(2 * (k.recorded.len() as u32 - 1)),
                    end_of_pass_write_index: Some(2 * (k.recorded.len() as u32 - 1) + 1),
                }),
                None => self.timestamps.as_ref().filter(|_| self.dispatches == 0).map(|t| ::wgpu::ComputePassTimestampWrites {
                    query_set: &t.set,
                    beginning_of_pass_write_index: Some(0),
                    end_of_pass_write_index: Some(1),
                }),
            };
            let pass = encoder.begin_compute_pass(&::wgpu::ComputePassDescriptor { label: Some("step"), timestamp_writes }).forget_lifetime();
            self.encoder = Some(encoder);
            self.pass = Some(pass);
        }
        let pass = self.pass.as_mut().expect("pass opened above");
        pass.set_pipeline(&kernel.pipeline);
        pass.set_bind_group(0, &self.bind_groups[&key], &[offset as u32]);
        pass.dispatch_workgroups(groups.0, groups.1, groups.2);
        self.dispatches += 1;
    }

    /// Submits everything recorded, copying `bytes` bytes of `src` back to the host.
    pub fn submit_and_read(&mut self, gpu: &Gpu, src: &GBuf, bytes: u64) -> Result<Vec<u8>> {
        if self.params.len() as u64 > self.params_buf.size {
            // A step never records more dispatches than the model's fixed count; reaching
            // this is a bug, reported rather than written out of bounds.
            let needed = self.params.len() as u64 / PARAMS_SLOT;
            self.reset();
            return Err(EngineError::Backend("gpu".into(), format!("a step recorded {needed} dispatches, more than planned")));
        }
        self.pass = None; // ends the compute pass
        let mut encoder = self.encoder.take().unwrap_or_else(|| gpu.device.create_command_encoder(&Default::default()));
        let bytes = bytes.next_multiple_of(4).max(4);
        if self.staging.as_ref().is_none_or(|s| s.size < bytes) {
            let usage = ::wgpu::BufferUsages::MAP_READ | ::wgpu::BufferUsages::COPY_DST;
            self.staging = Some(GBuf::new(gpu, "staging", bytes.next_power_of_two(), usage));
        }
        let staging = self.staging.clone().expect("staging allocated above");
        encoder.copy_buffer_to_buffer(&src.buf, 0, &staging.buf, 0, bytes);
        let timed = self.dispatches > 0 && self.timestamps.is_some() && self.kernel_timing.is_none();
        let kernels = self.kernel_timing.as_ref().map_or(0, |k| k.recorded.len() as u64);
        if let Some(k) = self.kernel_timing.as_ref().filter(|_| kernels > 0) {
            encoder.resolve_query_set(&k.set, 0..2 * kernels as u32, &k.resolve, 0);
            encoder.copy_buffer_to_buffer(&k.resolve, 0, &k.read, 0, 16 * kernels);
        }
        if let Some(t) = self.timestamps.as_ref().filter(|_| timed) {
            encoder.resolve_query_set(&t.set, 0..2, &t.resolve, 0);
            encoder.copy_buffer_to_buffer(&t.resolve, 0, &t.read, 0, 16);
        }
        if !self.params.is_empty() {
            gpu.queue.write_buffer(&self.params_buf.buf, 0, &self.params);
        }
        let started = self.first_dispatch.take();
        if let Some(s) = started {
            self.profile.encode_s += s.elapsed().as_secs_f64();
        }
        gpu.queue.submit([encoder.finish()]);
        self.profile.steps += 1;
        self.profile.dispatches += self.dispatches as u64;
        self.params.clear();
        self.dispatches = 0;
        if let Some(t) = self.timestamps.as_ref().filter(|_| timed) {
            t.read.slice(..).map_async(::wgpu::MapMode::Read, |_| {});
        }
        if let Some(k) = self.kernel_timing.as_ref().filter(|_| kernels > 0) {
            k.read.slice(..16 * kernels).map_async(::wgpu::MapMode::Read, |_| {});
        }
        let slice = staging.buf.slice(..bytes);
        let (tx, rx) = std::sync::mpsc::channel();
        slice.map_async(::wgpu::MapMode::Read, move |r| {
            let _ = tx.send(r);
        });
        gpu.device
            .poll(::wgpu::PollType::Wait { submission_index: None, timeout: None })
            .map_err(|e| EngineError::Backend("gpu".into(), format!("waiting for the device: {e}")))?;
        gpu.take_error()?;
        match rx.recv() {
            Ok(Ok(())) => {}
            Ok(Err(e)) => return Err(EngineError::Backend("gpu".into(), format!("reading results back: {e}"))),
            Err(_) => return Err(EngineError::Backend("gpu".into(), "reading results back: the map request was dropped".into())),
        }
        let out = slice.get_mapped_range().to_vec();
        staging.buf.unmap();
        if let Some(t) = self.timestamps.as_ref().filter(|_| timed) {
            let ticks: Vec<u64> = bytemuck::pod_collect_to_vec(&t.read.slice(..).get_mapped_range());
            t.read.unmap();
            self.profile.gpu_s += ticks[1].saturating_sub(ticks[0]) as f64 * t.period_ns * 1e-9;
        }
        if let (Some(k), Some(t)) = (self.kernel_timing.as_mut().filter(|_| kernels > 0), self.timestamps.as_ref()) {
            let ticks: Vec<u64> = bytemuck::pod_collect_to_vec(&k.read.slice(..16 * kernels).get_mapped_range());
            k.read.unmap();
            for (name, pair) in k.recorded.drain(..).zip(ticks.chunks_exact(2)) {
                let s = pair[1].saturating_sub(pair[0]) as f64 * t.period_ns * 1e-9;
                let e = k.totals.entry(name).or_default();
                *e = (e.0 + 1, e.1 + s);
                self.profile.gpu_s += s;
            }
        }
        if let Some(s) = started {
            self.profile.wall_s += s.elapsed().as_secs_f64();
        }
        Ok(out)
    }

    /// GPU seconds per kernel and workgroup count (with `UPG_BATCH_GPU_PROFILE_KERNELS=1`).
    pub fn kernel_totals(&self) -> Vec<(String, u64, f64)> {
        self.kernel_timing.as_ref().map_or_else(Vec::new, |k| k.totals.iter().map(|(n, &(c, s))| (n.clone(), c, s)).collect())
    }

    /// Drops whatever was recorded and not submitted.
    pub fn reset(&mut self) {
        if let Some(k) = self.kernel_timing.as_mut() {
            k.recorded.clear();
        }
        self.first_dispatch = None;
        self.pass = None;
        self.encoder = None;
        self.params.clear();
        self.dispatches = 0;
    }
}
