//! The WGSL kernels: embedded at build time from `shaders/`, assembled per weight format (one
//! weight-load snippet per format concatenated in), compiled once per variant and cached.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use crate::tensor::WeightFormat;

const MATMUL: &str = include_str!("../../../../shaders/matmul.wgsl");
const MATMUL_SEGMENTS_1: &str = include_str!("../../../../shaders/matmul_segments_1.wgsl");
const MATMUL_SEGMENTS_3: &str = include_str!("../../../../shaders/matmul_segments_3.wgsl");
const LOAD8: &str = include_str!("../../../../shaders/load8.wgsl");
const LOAD8_F16: &str = include_str!("../../../../shaders/load8_f16.wgsl");
const LOAD8_Q8_0: &str = include_str!("../../../../shaders/load8_q8_0.wgsl");
const LOAD8_Q4_0: &str = include_str!("../../../../shaders/load8_q4_0.wgsl");
const LOAD8_Q4_K: &str = include_str!("../../../../shaders/load8_q4_k.wgsl");
const BYTES8: &str = include_str!("../../../../shaders/bytes8.wgsl");
const EMBED: &str = include_str!("../../../../shaders/embed.wgsl");
const RMSNORM: &str = include_str!("../../../../shaders/rmsnorm.wgsl");
const ROPE_KV: &str = include_str!("../../../../shaders/rope_kv.wgsl");
const ATTENTION: &str = include_str!("../../../../shaders/attention.wgsl");
const KV_F32: &str = include_str!("../../../../shaders/kv_f32.wgsl");
const KV_F16: &str = include_str!("../../../../shaders/kv_f16.wgsl");
const KV_PUT_F32: &str = include_str!("../../../../shaders/kv_put_f32.wgsl");
const KV_PUT_F16: &str = include_str!("../../../../shaders/kv_put_f16.wgsl");
const ELEMENTWISE: &str = include_str!("../../../../shaders/elementwise.wgsl");
const BANDWIDTH: &str = include_str!("../../../../shaders/bandwidth.wgsl");
const WEIGHTS_F32: &str = include_str!("../../../../shaders/weights_f32.wgsl");
const WEIGHTS_F16: &str = include_str!("../../../../shaders/weights_f16.wgsl");
const WEIGHTS_BF16: &str = include_str!("../../../../shaders/weights_bf16.wgsl");
const WEIGHTS_Q8_0: &str = include_str!("../../../../shaders/weights_q8_0.wgsl");
const WEIGHTS_Q4_0: &str = include_str!("../../../../shaders/weights_q4_0.wgsl");
const WEIGHTS_Q5_0: &str = include_str!("../../../../shaders/weights_q5_0.wgsl");
const WEIGHTS_Q4_K: &str = include_str!("../../../../shaders/weights_q4_k.wgsl");
const WEIGHTS_Q6_K: &str = include_str!("../../../../shaders/weights_q6_k.wgsl");

/// A matrix-product tile: (R output rows, TB batch rows, G groups of 32 lanes per workgroup,
/// U chunks loaded at a time: UNROLL); see matmul.wgsl.
pub type Tile = (u32, u32, u32, u32);

/// Default tiles, the fastest of those measured on an H100 (docs/benchmarks.md): one row alone
/// (1 row a group, 8 groups), and batches (4 rows by 8 batch rows a group, 2 groups; 2 rows
/// when gated, to keep the partials within workgroup memory).
const DECODE_TILE: Tile = (1, 1, 8, 1);
const BATCH_TILE: Tile = (4, 8, 2, 1);

/// Workgroup memory the matrix product may use: WebGPU's default limit, which every adapter
/// grants.
const WORKGROUP_FLOATS: u32 = 16384 / 4;

/// The partial sums a lane keeps for `tile`.
fn partial_sets((r, tb, _, _): Tile, gated: bool) -> u32 {
    r * tb * if gated { 2 } else { 1 } + tb
}

/// Whether `tile`'s partials fit workgroup memory (matmul.wgsl's `red` and `sums`).
pub fn tile_fits(tile: Tile, gated: bool) -> bool {
    let (r, tb, g, u) = tile;
    let sets = partial_sets(tile, gated);
    r >= 1 && tb >= 1 && matches!(g, 1 | 2 | 4 | 8) && matches!(u, 1 | 2 | 4) && g * (32 * (sets | 1) + sets) <= WORKGROUP_FLOATS
}

/// The matrix-product tiles of one backend: for one row alone, and for batches.
#[derive(Clone, Copy, Debug)]
pub struct Tiles {
    pub decode: Tile,
    pub batch: Tile,
}

impl Default for Tiles {
    fn default() -> Self {
        Tiles { decode: DECODE_TILE, batch: BATCH_TILE }
    }
}

impl Tiles {
    /// The defaults, or `UPG_BATCH_GPU_DECODE_TILE=RxG[xU]` and `UPG_BATCH_GPU_BATCH_TILE=RxTBxG[xU]`
    /// (for benchmarks comparing tiles); a tile whose partials do not fit keeps the default.
    pub fn from_env() -> Tiles {
        let parse = |name: &str| -> Option<Vec<u32>> { std::env::var(name).ok()?.split('x').map(|p| p.trim().parse().ok()).collect() };
        let decode = match parse("UPG_BATCH_GPU_DECODE_TILE").as_deref() {
            Some(&[r, g]) if tile_fits((r, 1, g, 1), true) => (r, 1, g, 1),
            Some(&[r, g, u]) if tile_fits((r, 1, g, u), true) => (r, 1, g, u),
            _ => DECODE_TILE,
        };
        let batch = match parse("UPG_BATCH_GPU_BATCH_TILE").as_deref() {
            Some(&[r, tb, g]) if tile_fits((r, tb, g, 1), false) => (r, tb, g, 1),
            Some(&[r, tb, g, u]) if tile_fits((r, tb, g, u), false) => (r, tb, g, u),
            _ => BATCH_TILE,
        };
        Tiles { decode, batch }
    }

    /// The tile for a batch of `n` rows. The tile never changes the order in which an output
    /// element is summed, so any choice keeps batch invariance.
    pub fn for_batch(&self, n: usize, gated: bool) -> Tile {
        let mut tile = if n <= 1 { self.decode } else { self.batch };
        while !tile_fits(tile, gated) && tile.0 > 1 {
            tile.0 /= 2;
        }
        tile
    }
}

/// How a kernel sees one binding.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum Slot {
    /// The per-dispatch parameters: a uniform block at a dynamic offset.
    Params,
    Read,
    ReadWrite,
}

/// One kernel variant.
#[derive(Clone, Copy, PartialEq, Eq, Hash, Debug)]
pub enum KernelId {
    /// `tile`: (output rows, batch rows, groups, chunks at a time) per workgroup (R, TB, G, U
    /// in matmul.wgsl).
    /// `qkv`: three matrices (q, k, v) into three outputs in one dispatch.
    Matmul {
        format: WeightFormat,
        gated: bool,
        tile: Tile,
        qkv: bool,
    },
    Embed(WeightFormat),
    RmsNorm,
    /// RoPE and the KV-cache write; true: an f16 cache.
    RopeKv(bool),
    /// Decode attention over the KV cache; true: an f16 cache.
    Attention(bool),
    Elementwise,
    /// A plain streaming read (the bandwidth ceiling of benchmarks).
    Bandwidth,
}

impl KernelId {
    /// Every variant, for shader validation.
    pub fn all() -> Vec<KernelId> {
        let formats = WeightFormat::ALL;
        let mut all: Vec<KernelId> = formats
            .iter()
            .flat_map(|&f| {
                [(false, false), (true, false), (false, true)]
                    .into_iter()
                    .flat_map(move |(gated, qkv)| [1, 4, 32].map(|n| KernelId::Matmul { format: f, gated, tile: Tiles::default().for_batch(n, gated), qkv }))
            })
            .collect();
        all.extend(formats.iter().map(|&f| KernelId::Embed(f)));
        all.extend([KernelId::RmsNorm, KernelId::Elementwise, KernelId::Bandwidth]);
        all.extend([false, true].into_iter().flat_map(|f16| [KernelId::RopeKv(f16), KernelId::Attention(f16)]));
        all
    }

    pub fn name(self) -> String {
        match self {
            KernelId::Matmul { format, gated, tile: (r, tb, g, u), qkv } => {
                format!("matmul_{}{}{}_{r}x{tb}x{g}x{u}", format.name(), if gated { "_gated" } else { "" }, if qkv { "_qkv" } else { "" })
            }
            KernelId::Embed(f) => format!("embed_{}", f.name()),
            KernelId::RmsNorm => "rmsnorm".into(),
            KernelId::RopeKv(f16) => format!("rope_kv{}", if f16 { "_f16" } else { "" }),
            KernelId::Attention(f16) => format!("attention{}", if f16 { "_f16" } else { "" }),
            KernelId::Elementwise => "elementwise".into(),
            KernelId::Bandwidth => "bandwidth".into(),
        }
    }

    /// The assembled WGSL source.
    pub fn source(self) -> String {
        match self {
            KernelId::Matmul { format, gated, tile: (r, tb, g, u), qkv } => {
                let ss0 = if gated { 2 * r * tb } else { r * tb };
                let body = MATMUL
                    .replace("$GATED", if gated { "true" } else { "false" })
                    .replace("$R", &r.to_string())
                    .replace("$TB", &tb.to_string())
                    .replace("$G", &g.to_string())
                    .replace("$U", &u.to_string())
                    .replace("$SS0", &ss0.to_string());
                let mut source = format!("{}\n{}\n", matmul_weight_snippet(format, "W", 1), matmul_weight_snippet(format, "U", 6));
                if qkv {
                    source += &matmul_weight_snippet(format, "V", 7);
                    source += MATMUL_SEGMENTS_3;
                } else {
                    source += MATMUL_SEGMENTS_1;
                }
                source + "\n" + &body
            }
            KernelId::Embed(format) => format!("{}\n{}", weight_snippet(format, "W", 1), EMBED),
            KernelId::RmsNorm => RMSNORM.into(),
            KernelId::RopeKv(f16) => {
                let (kv, put) = if f16 { (KV_F16, KV_PUT_F16) } else { (KV_F32, KV_PUT_F32) };
                format!("{}\n{put}\n{ROPE_KV}", kv.replace("$KB", "6").replace("$VB", "7").replace("$ACCESS", "read_write"))
            }
            KernelId::Attention(f16) => {
                let kv = if f16 { KV_F16 } else { KV_F32 };
                format!("{}\n{ATTENTION}", kv.replace("$KB", "2").replace("$VB", "3").replace("$ACCESS", "read"))
            }
            KernelId::Elementwise => ELEMENTWISE.into(),
            KernelId::Bandwidth => BANDWIDTH.into(),
        }
    }

    /// The kernel's bindings, in binding order from 0.
    pub fn slots(self) -> &'static [Slot] {
        use Slot::*;
        match self {
            // params, W, X, Y, bias, norm weight, U (+ V, Y1, Y2, bias1, bias2)
            KernelId::Matmul { qkv: false, .. } => &[Params, Read, Read, ReadWrite, Read, Read, Read],
            KernelId::Matmul { qkv: true, .. } => &[Params, Read, Read, ReadWrite, Read, Read, Read, Read, ReadWrite, ReadWrite, Read, Read],
            // params, table, Y, rows
            KernelId::Embed(_) => &[Params, Read, ReadWrite, Read],
            // params, X, Y, G, gather index
            KernelId::RmsNorm => &[Params, Read, ReadWrite, Read, Read],
            // params, Q, K, V, table, rows, K cache, V cache
            KernelId::RopeKv(_) => &[Params, ReadWrite, ReadWrite, Read, Read, Read, ReadWrite, ReadWrite],
            // params, Q, K cache, V cache, out, rows
            KernelId::Attention(_) => &[Params, Read, Read, Read, ReadWrite, Read],
            // params, A, B
            KernelId::Elementwise => &[Params, ReadWrite, Read],
            // params, the buffer, an output never written in practice
            KernelId::Bandwidth => &[Params, Read, ReadWrite],
        }
    }
}

/// The weight-load functions of `format` for a matrix named `name` at `binding`.
fn weight_snippet(format: WeightFormat, name: &str, binding: u32) -> String {
    let template = match format {
        WeightFormat::F32 => WEIGHTS_F32,
        WeightFormat::F16 => WEIGHTS_F16,
        WeightFormat::Bf16 => WEIGHTS_BF16,
        WeightFormat::Q8_0 => WEIGHTS_Q8_0,
        WeightFormat::Q4_0 => WEIGHTS_Q4_0,
        WeightFormat::Q5_0 => WEIGHTS_Q5_0,
        WeightFormat::Q4K => WEIGHTS_Q4_K,
        WeightFormat::Q6K => WEIGHTS_Q6_K,
    };
    template.replace("$W", name).replace("$B", &binding.to_string())
}

/// The weight-load functions of `format` for a matrix product's matrix: the format's own, and
/// its 8-element load (a format's own where it has one, else two 4-element loads).
fn matmul_weight_snippet(format: WeightFormat, name: &str, binding: u32) -> String {
    const ANY: &str = "fn load8_$W(i: u32, hi: bool) -> Pair {\n    return load8_any_$W(i, hi);\n}\n";
    let own = match format {
        WeightFormat::F16 => LOAD8_F16.to_string(),
        WeightFormat::Q8_0 => format!("{BYTES8}\n{LOAD8_Q8_0}"),
        WeightFormat::Q4_0 => format!("{BYTES8}\n{LOAD8_Q4_0}"),
        WeightFormat::Q4K => LOAD8_Q4_K.to_string(),
        _ => ANY.to_string(),
    };
    format!("{}\n{}\n{}", weight_snippet(format, name, binding), LOAD8.replace("$W", name), own.replace("$W", name))
}

/// Size of one parameter block (a uniform at a dynamic offset): the largest offset alignment
/// an adapter may require.
pub const PARAMS_SLOT: u64 = 256;

pub struct Kernel {
    pub id: KernelId,
    pub index: u64,
    pub pipeline: ::wgpu::ComputePipeline,
    pub layout: ::wgpu::BindGroupLayout,
}

/// What wgpu adds to the kernels when it compiles them (`UPG_BATCH_GPU_SHADER_CHECKS`).
///
/// wgpu's defaults guard untrusted shaders: a hidden 64-bit counter in every loop (so that no
/// loop can run forever), bounds checks on every index, and zeroed workgroup memory before
/// each workgroup starts. These kernels are the engine's own: every loop is bounded by its
/// parameters, and no kernel reads workgroup memory before writing it. The loop counter
/// keeps the driver's compiler from unrolling and pipelining loads (each lane then waits out
/// one memory latency per iteration), so it is left out by default.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum ShaderChecks {
    /// Bounds checks kept; no loop counter, no workgroup zeroing (the default).
    Bounds,
    /// wgpu's defaults: bounds checks, loop counters, zeroed workgroup memory.
    All,
    /// Nothing added (benchmarks only: an out-of-range index is then undefined behaviour).
    None,
}

pub const SHADER_CHECKS_ENV: &str = "UPG_BATCH_GPU_SHADER_CHECKS";

impl ShaderChecks {
    /// `UPG_BATCH_GPU_SHADER_CHECKS` = `bounds` (default), `all` or `none`.
    pub fn from_env() -> Result<ShaderChecks, String> {
        match std::env::var(SHADER_CHECKS_ENV).ok().as_deref().map(str::trim) {
            None | Some("") | Some("bounds") => Ok(ShaderChecks::Bounds),
            Some("all") => Ok(ShaderChecks::All),
            Some("none") => Ok(ShaderChecks::None),
            Some(other) => Err(format!("{SHADER_CHECKS_ENV}={other:?}: expected bounds, all or none")),
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            ShaderChecks::Bounds => "bounds",
            ShaderChecks::All => "all",
            ShaderChecks::None => "none",
        }
    }

    fn runtime_checks(self) -> ::wgpu::ShaderRuntimeChecks {
        ::wgpu::ShaderRuntimeChecks { bounds_checks: self != ShaderChecks::None, force_loop_bounding: self == ShaderChecks::All }
    }
}

/// Compiled kernels, created on first use and kept.
pub struct Kernels {
    cache: Mutex<HashMap<KernelId, Arc<Kernel>>>,
    checks: ShaderChecks,
}

impl Kernels {
    pub fn new(checks: ShaderChecks) -> Kernels {
        Kernels { cache: Mutex::default(), checks }
    }

    pub fn checks(&self) -> ShaderChecks {
        self.checks
    }

    pub fn get(&self, device: &::wgpu::Device, id: KernelId) -> Arc<Kernel> {
        let mut cache = self.cache.lock().unwrap_or_else(|e| e.into_inner());
        let index = cache.len() as u64;
        cache.entry(id).or_insert_with(|| Arc::new(build(device, id, index, self.checks))).clone()
    }
}

fn build(device: &::wgpu::Device, id: KernelId, index: u64, checks: ShaderChecks) -> Kernel {
    let name = id.name();
    let source = ::wgpu::ShaderModuleDescriptor { label: Some(&name), source: ::wgpu::ShaderSource::Wgsl(id.source().into()) };
    // SAFETY: the kernels are this crate's own WGSL, whose loops all end (each is bounded by a
    // parameter or a constant) and which write workgroup memory before reading it; with
    // `ShaderChecks::None`, which only benchmarks select, indices are unchecked as well.
    let module = unsafe { device.create_shader_module_trusted(source, checks.runtime_checks()) };
    let entries: Vec<::wgpu::BindGroupLayoutEntry> = id
        .slots()
        .iter()
        .enumerate()
        .map(|(i, slot)| ::wgpu::BindGroupLayoutEntry {
            binding: i as u32,
            visibility: ::wgpu::ShaderStages::COMPUTE,
            ty: match slot {
                Slot::Params => ::wgpu::BindingType::Buffer {
                    ty: ::wgpu::BufferBindingType::Uniform,
                    has_dynamic_offset: true,
                    min_binding_size: std::num::NonZeroU64::new(PARAMS_SLOT),
                },
                Slot::Read | Slot::ReadWrite => ::wgpu::BindingType::Buffer {
                    ty: ::wgpu::BufferBindingType::Storage { read_only: *slot == Slot::Read },
                    has_dynamic_offset: false,
                    min_binding_size: None,
                },
            },
            count: None,
        })
        .collect();
    let layout = device.create_bind_group_layout(&::wgpu::BindGroupLayoutDescriptor { label: Some(&name), entries: &entries });
    let pipeline_layout =
        device.create_pipeline_layout(&::wgpu::PipelineLayoutDescriptor { label: Some(&name), bind_group_layouts: &[&layout], push_constant_ranges: &[] });
    let pipeline = device.create_compute_pipeline(&::wgpu::ComputePipelineDescriptor {
        label: Some(&name),
        layout: Some(&pipeline_layout),
        module: &module,
        entry_point: Some("main"),
        compilation_options: ::wgpu::PipelineCompilationOptions {
            zero_initialize_workgroup_memory: checks == ShaderChecks::All,
            ..Default::default()
        },
        cache: None,
    });
    Kernel { id, index, pipeline, layout }
}

#[cfg(test)]
mod tests {
    use super::KernelId;

    /// Every kernel variant parses and validates, and translates to Metal Shading Language
    /// (what wgpu hands Metal on macOS) and SPIR-V (Vulkan), as naga does inside wgpu: what
    /// Metal would reject fails here, on any machine.
    #[test]
    fn every_shader_translates_to_msl_and_spirv() {
        for id in KernelId::all() {
            let name = id.name();
            let module = naga::front::wgsl::parse_str(&id.source()).unwrap_or_else(|e| panic!("{name}: WGSL: {}", e.emit_to_string(&id.source())));
            // unpack2x16float (f16 weights) needs SHADER_FLOAT16_IN_FLOAT32, which wgpu grants
            // on Vulkan and Metal (downlevel flag SHADER_F16_IN_F32); the backend checks it.
            let caps = naga::valid::Capabilities::default() | naga::valid::Capabilities::SHADER_FLOAT16_IN_FLOAT32;
            let info = naga::valid::Validator::new(naga::valid::ValidationFlags::all(), caps)
                .validate(&module)
                .unwrap_or_else(|e| panic!("{name}: validation: {e:?}"));
            let options = naga::back::msl::Options { lang_version: (2, 4), ..Default::default() };
            let (msl, _) = naga::back::msl::write_string(&module, &info, &options, &naga::back::msl::PipelineOptions::default())
                .unwrap_or_else(|e| panic!("{name}: MSL: {e}"));
            assert!(msl.contains("kernel void"), "{name}: no compute entry point in the MSL");
            let spv = naga::back::spv::write_vec(&module, &info, &naga::back::spv::Options::default(), None).unwrap_or_else(|e| panic!("{name}: SPIR-V: {e}"));
            assert_eq!(spv.first(), Some(&0x0723_0203), "{name}: not a SPIR-V module");
        }
    }
}
