//! The loaded model on the backend `backend=` chose: one decoder type per backend behind one
//! enum, so the rest of the engine is written once (`with_decoder!`).

use crate::model::checkpoint::Checkpoint;

use crate::backend::cpu::matmul::BlockActs;
use crate::backend::cpu::CpuBackend;
use crate::backend::BackendKind;
use crate::error::{EngineError, Result};
use crate::model::config::ModelConfig;
use crate::model::decoder::Decoder;
use crate::model::scheme::WeightScheme;

#[cfg(feature = "gpu")]
use crate::backend::wgpu::WgpuBackend;

pub enum Model {
    Cpu(Decoder<CpuBackend>),
    #[cfg(feature = "gpu")]
    Gpu(Decoder<WgpuBackend>),
}

/// Runs `$body` with `$m` bound to the decoder, whatever its backend.
#[macro_export]
macro_rules! with_decoder {
    ($model:expr, $m:ident => $body:expr) => {
        match $model {
            $crate::engine::Model::Cpu($m) => $body,
            #[cfg(feature = "gpu")]
            $crate::engine::Model::Gpu($m) => $body,
        }
    };
}

impl Model {
    /// `activations`: "" (the backend's own: int8 on the CPU, f32 on the GPU), "int8" (CPU
    /// only) or "f32", for products with block-format weights. `kv_cache`: "" or "f32", or
    /// "f16".
    #[allow(clippy::too_many_arguments)]
    pub fn load(backend: &str, activations: &str, kv_cache: &str, ckpt: &Checkpoint, cfg: ModelConfig, scheme: WeightScheme, fused: bool) -> Result<Self> {
        let (cpu_acts, gpu_ok) = match activations {
            "" | "int8" => (BlockActs::Int8, activations.is_empty()),
            "f32" => (BlockActs::F32, true),
            other => return Err(EngineError::InvalidArgument(format!("activations must be 'int8' or 'f32' (or None for the backend's own), not {other:?}"))),
        };
        let kv_f16 = match kv_cache {
            "" | "f32" => false,
            "f16" => true,
            other => return Err(EngineError::InvalidArgument(format!("kv_cache must be 'f32' or 'f16' (or None for f32), not {other:?}"))),
        };
        let cpu = || CpuBackend { acts: cpu_acts, kv_f16 };
        let kind = BackendKind::parse(backend)?;
        if !gpu_ok && kind == BackendKind::Gpu {
            return Err(EngineError::InvalidArgument("activations='int8' is for the cpu backend; the gpu backend keeps activations in f32".into()));
        }
        match kind {
            BackendKind::Cpu => Ok(Model::Cpu(Decoder::load(cpu(), ckpt, cfg, scheme, fused)?)),
            #[cfg(feature = "gpu")]
            BackendKind::Gpu => {
                crate::backend::wgpu::check_shapes(cfg.head_dim)?;
                let mut b = WgpuBackend::new(false)?;
                b.kv_f16 = kv_f16;
                Ok(Model::Gpu(Decoder::load(b, ckpt, cfg, scheme, fused)?))
            }
            #[cfg(feature = "gpu")]
            BackendKind::Auto => match crate::backend::wgpu::check_shapes(cfg.head_dim).and_then(|_| WgpuBackend::new(true)) {
                Ok(mut b) => {
                    b.kv_f16 = kv_f16;
                    Ok(Model::Gpu(Decoder::load(b, ckpt, cfg, scheme, fused)?))
                }
                Err(_) => Ok(Model::Cpu(Decoder::load(cpu(), ckpt, cfg, scheme, fused)?)),
            },
            #[cfg(not(feature = "gpu"))]
            BackendKind::Auto => Ok(Model::Cpu(Decoder::load(cpu(), ckpt, cfg, scheme, fused)?)),
            #[cfg(not(feature = "gpu"))]
            BackendKind::Gpu => unreachable!("BackendKind::parse refuses gpu without the feature"),
        }
    }

    pub fn cfg(&self) -> &ModelConfig {
        with_decoder!(self, m => &m.cfg)
    }

    pub fn scheme(&self) -> WeightScheme {
        with_decoder!(self, m => m.scheme)
    }

    pub fn fused(&self) -> bool {
        with_decoder!(self, m => m.fused)
    }

    pub fn weight_bytes(&self) -> usize {
        with_decoder!(self, m => m.weight_bytes())
    }

    /// Matrices held in a 16-bit format because their rows are not whole blocks of the one
    /// asked for.
    pub fn weight_fallbacks(&self) -> Vec<String> {
        with_decoder!(self, m => m.loaded.fallbacks.clone())
    }

    /// Bytes the checkpoint stores for the matrices (norms and biases left out).
    pub fn checkpoint_matrix_bytes(&self) -> usize {
        with_decoder!(self, m => m.loaded.stored_bytes)
    }

    pub fn parameter_count(&self) -> usize {
        with_decoder!(self, m => m.parameter_count())
    }

    /// The GPU adapter: its name, API (Metal, Vulkan), device type, the dispatches of the
    /// last step, and the checks compiled into the kernels.
    pub fn gpu_info(&self) -> Option<(String, &'static str, &'static str, usize, &'static str)> {
        match self {
            Model::Cpu(_) => None,
            #[cfg(feature = "gpu")]
            Model::Gpu(m) => Some((m.backend.adapter_name(), m.backend.api(), m.backend.device_type(), m.backend.dispatches_last_step(), m.backend.shader_checks())),
        }
    }

    /// GPU seconds per kernel and workgroup count since load: (kernel, dispatches, seconds);
    /// empty unless `UPG_BATCH_GPU_PROFILE_KERNELS=1` was set when the GPU was opened.
    pub fn gpu_kernel_times(&self) -> Vec<(String, u64, f64)> {
        match self {
            Model::Cpu(_) => Vec::new(),
            #[cfg(feature = "gpu")]
            Model::Gpu(m) => m.backend.kernel_times(),
        }
    }

    /// The GPU's step profile: (steps, dispatches, encode s, wall s, GPU s or None).
    pub fn gpu_profile(&self) -> Option<(u64, u64, f64, f64, Option<f64>)> {
        match self {
            Model::Cpu(_) => None,
            #[cfg(feature = "gpu")]
            Model::Gpu(m) => {
                let p = m.backend.profile();
                Some((p.steps, p.dispatches, p.encode_s, p.wall_s, p.has_timestamps.then_some(p.gpu_s)))
            }
        }
    }

    /// "cpu" or "gpu".
    pub fn backend_name(&self) -> &'static str {
        match self {
            Model::Cpu(_) => "cpu",
            #[cfg(feature = "gpu")]
            Model::Gpu(_) => "gpu",
        }
    }

    /// The element type of the KV cache.
    pub fn kv_cache(&self) -> &'static str {
        match self {
            Model::Cpu(m) if m.backend.kv_f16 => "f16",
            #[cfg(feature = "gpu")]
            Model::Gpu(m) if m.backend.kv_f16 => "f16",
            _ => "f32",
        }
    }

    /// How products with block-format weights take the activations.
    pub fn activations(&self) -> &'static str {
        match self {
            Model::Cpu(m) if m.backend.acts == BlockActs::Int8 => "int8",
            _ => "f32",
        }
    }
}
