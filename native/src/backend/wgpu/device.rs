//! Picking a GPU adapter and opening its device.
//!
//! Without `UPG_BATCH_GPU_ADAPTER`, the best hardware adapter is taken (discrete, then
//! integrated, then virtual); software rasterizers (lavapipe, SwiftShader) are never picked
//! on their own. `UPG_BATCH_GPU_ADAPTER` (a case-insensitive part of an adapter's name, e.g.
//! `llvmpipe` or `apple`) forces one adapter, software ones included.

use std::sync::{Arc, Mutex};

use crate::error::{EngineError, Result};

pub const ADAPTER_ENV: &str = "UPG_BATCH_GPU_ADAPTER";

pub struct Gpu {
    pub device: ::wgpu::Device,
    pub queue: ::wgpu::Queue,
    pub info: ::wgpu::AdapterInfo,
    pub limits: ::wgpu::Limits,
    /// Shaders may unpack f16 pairs to f32 (unpack2x16float), which f16 weights need.
    pub f16_in_f32: bool,
    /// The first error the device reported outside a call that returns one (validation,
    /// out of memory, device lost); reported by the next read.
    pub error: Arc<Mutex<Option<String>>>,
}

fn gpu_error(message: impl Into<String>) -> EngineError {
    EngineError::Backend("gpu".into(), message.into())
}

fn describe(info: &::wgpu::AdapterInfo) -> String {
    format!("{} ({:?}, {:?})", info.name, info.device_type, info.backend)
}

/// Opens the adapter the environment or the hardware selects.
pub fn open() -> Result<Gpu> {
    let instance = ::wgpu::Instance::new(&::wgpu::InstanceDescriptor {
        backends: ::wgpu::Backends::VULKAN | ::wgpu::Backends::METAL,
        ..Default::default()
    });
    let adapters = instance.enumerate_adapters(::wgpu::Backends::VULKAN | ::wgpu::Backends::METAL);
    let found: Vec<String> = adapters.iter().map(|a| describe(&a.get_info())).collect();
    let found_text = if found.is_empty() {
        "no Vulkan or Metal adapter at all (on Linux: is a Vulkan driver and libvulkan1 installed?)".to_string()
    } else {
        format!("adapters found: {}", found.join("; "))
    };
    let wanted = std::env::var(ADAPTER_ENV).ok().filter(|s| !s.trim().is_empty());
    let adapter = match &wanted {
        Some(name) => {
            let needle = name.trim().to_lowercase();
            adapters.into_iter().find(|a| a.get_info().name.to_lowercase().contains(&needle)).ok_or_else(|| {
                gpu_error(format!("{ADAPTER_ENV}={name:?} matches no adapter; {found_text}"))
            })?
        }
        None => {
            let rank = |t: ::wgpu::DeviceType| match t {
                ::wgpu::DeviceType::DiscreteGpu => Some(0),
                ::wgpu::DeviceType::IntegratedGpu => Some(1),
                ::wgpu::DeviceType::VirtualGpu => Some(2),
                ::wgpu::DeviceType::Cpu | ::wgpu::DeviceType::Other => None,
            };
            let mut hardware: Vec<_> = adapters.into_iter().filter_map(|a| rank(a.get_info().device_type).map(|r| (r, a))).collect();
            hardware.sort_by_key(|(r, _)| *r);
            hardware.into_iter().next().map(|(_, a)| a).ok_or_else(|| {
                gpu_error(format!(
                    "no hardware GPU adapter; {found_text}. Set {ADAPTER_ENV} to part of an adapter's name to use it anyway (e.g. llvmpipe, a software driver)"
                ))
            })?
        }
    };
    let info = adapter.get_info();
    let limits = adapter.limits();
    let f16_in_f32 = adapter.get_downlevel_capabilities().flags.contains(::wgpu::DownlevelFlags::SHADER_F16_IN_F32);
    let (device, queue) = pollster::block_on(adapter.request_device(&::wgpu::DeviceDescriptor {
        label: Some("upg-batch"),
        // Timestamps time each step's pass for benchmarks, where the adapter has them.
        required_features: adapter.features() & ::wgpu::Features::TIMESTAMP_QUERY,
        required_limits: limits.clone(),
        experimental_features: ::wgpu::ExperimentalFeatures::disabled(),
        memory_hints: ::wgpu::MemoryHints::Performance,
        trace: ::wgpu::Trace::Off,
    }))
    .map_err(|e| gpu_error(format!("cannot open {}: {e}", describe(&info))))?;
    let error = Arc::new(Mutex::new(None));
    let sink = error.clone();
    device.on_uncaptured_error(Arc::new(move |e: ::wgpu::Error| {
        let mut slot = sink.lock().unwrap_or_else(|p| p.into_inner());
        slot.get_or_insert_with(|| e.to_string());
    }));
    let sink = error.clone();
    device.set_device_lost_callback(move |reason, message| {
        let mut slot = sink.lock().unwrap_or_else(|p| p.into_inner());
        slot.get_or_insert_with(|| format!("device lost ({reason:?}): {message}"));
    });
    Ok(Gpu { device, queue, info, limits, f16_in_f32, error })
}

impl Gpu {
    pub fn name(&self) -> String {
        self.info.name.clone()
    }

    pub fn api(&self) -> &'static str {
        match self.info.backend {
            ::wgpu::Backend::Vulkan => "Vulkan",
            ::wgpu::Backend::Metal => "Metal",
            ::wgpu::Backend::Dx12 => "DirectX 12",
            ::wgpu::Backend::Gl => "OpenGL",
            ::wgpu::Backend::BrowserWebGpu => "WebGPU",
            ::wgpu::Backend::Noop => "none",
        }
    }

    pub fn is_software(&self) -> bool {
        self.info.device_type == ::wgpu::DeviceType::Cpu
    }

    /// The error the device reported since the last check, if any.
    pub fn take_error(&self) -> Result<()> {
        match self.error.lock().unwrap_or_else(|p| p.into_inner()).take() {
            Some(message) => Err(gpu_error(format!("{}: {message}", self.info.name))),
            None => Ok(()),
        }
    }
}
