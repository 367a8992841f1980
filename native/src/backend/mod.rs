//! Compute backends. The CPU backend is always built; a GPU backend (wgpu) slots in beside it
//! behind the same model code.

pub mod cpu;

use crate::error::{EngineError, Result};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    Cpu,
}

impl Backend {
    pub fn parse(name: &str) -> Result<Self> {
        match name {
            "cpu" => Ok(Backend::Cpu),
            "gpu" | "wgpu" | "metal" | "vulkan" => Err(EngineError::Backend(
                name.to_string(),
                "this engine was built without the `gpu` feature (wgpu); use backend=\"cpu\"".into(),
            )),
            other => Err(EngineError::InvalidArgument(format!("backend {other:?} is unknown (expected \"cpu\" or \"gpu\")"))),
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Backend::Cpu => "cpu",
        }
    }
}
