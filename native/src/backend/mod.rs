//! Compute backends behind one trait. The decoder (`model::decoder`) holds the forward pass
//! once, generic over `Backend`; a backend owns device memory (weights, activations, the KV
//! cache) and the ops a decoder needs. The CPU backend is always built; the wgpu backend
//! (Metal on macOS, Vulkan on Linux) is built with the `gpu` feature (on by default).
//!
//! Reads (`read`) are the only points where a backend must finish its queued work, so a GPU
//! backend records a whole step and submits it once.

#[cfg(test)]
mod conformance;
pub mod cpu;
#[cfg(feature = "gpu")]
pub mod wgpu;

use crate::error::{EngineError, Result};
use crate::tensor::{HostTensor, WeightFormat};

/// The gated MLP's activation: act(gate(x)) * up(x).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Activation {
    Silu,
    /// GELU with the tanh approximation (`gelu_pytorch_tanh`).
    GeluTanh,
}

/// One token of one sequence in a step: the sequence's cache slot, its position, its token.
#[derive(Clone, Copy, Debug)]
pub struct StepRow {
    pub slot: usize,
    pub pos: usize,
    pub token: u32,
}

/// What every op of one forward step may need about its rows, prepared by the decoder.
pub struct StepInput<'a> {
    pub rows: &'a [StepRow],
    /// Rotary tables (tables, rows, 2 * head_dim/2): per table and row, cos then sin of every
    /// rotary pair's angle at the row's position. Table 0 is the model's; a model whose
    /// sliding layers rotate with their own base has a table 1.
    pub rope: &'a [f32],
    /// Rows whose logits are read back (the last token of a sequence), in output order.
    pub logit_rows: &'a [usize],
}

/// Attention geometry of one layer.
#[derive(Clone, Copy, Debug)]
pub struct AttentionShape {
    pub heads: usize,
    pub kv_heads: usize,
    pub head_dim: usize,
    /// Attend only to the last `window` positions (sliding-window attention).
    pub window: Option<usize>,
    pub scale: f32,
}

/// Sizes of a KV cache: per layer, K and V as (slots, context, kv_dim).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CacheShape {
    pub layers: usize,
    pub kv_dim: usize,
    pub slots: usize,
    pub context: usize,
}

/// A compute backend: device memory and the ops of a LLaMA-family decoder. Every op works
/// on the first `n` rows of its buffers, and every output element is reduced in a fixed
/// order that does not depend on `n` (batch invariance).
pub trait Backend: Send + Sync + Sized {
    /// A weight matrix W (rows, cols) held in a format.
    type Matrix: Send + Sync;
    /// A small f32 vector (norm weight, bias).
    type Vector: Send + Sync;
    /// An f32 activation buffer (rows, width), allocated once per shape and reused.
    type Act: Send;
    /// The KV cache of every sequence slot.
    type Cache: Send;
    /// A step's inputs, uploaded once per step.
    type Step;

    /// Human-readable description (device, API).
    fn describe(&self) -> String;

    /// W (rows, cols) = `t` converted to `format`.
    fn upload_matrix(&self, t: &HostTensor<'_>, rows: usize, cols: usize, format: WeightFormat) -> Result<Self::Matrix>;
    fn upload_vector(&self, values: &[f32]) -> Result<Self::Vector>;
    fn matrix_bytes(&self, m: &Self::Matrix) -> usize;

    /// A buffer for up to `rows` rows of `width` f32s.
    fn activation(&self, rows: usize, width: usize) -> Result<Self::Act>;
    fn new_cache(&self, shape: CacheShape) -> Result<Self::Cache>;
    /// Make slot `slot` ready for `positions` positions (a hint: exact reservations).
    fn cache_reserve(&self, cache: &mut Self::Cache, slot: usize, positions: usize);
    /// Forget a slot's positions (and free what a growing cache holds for them).
    fn cache_reset(&self, cache: &mut Self::Cache, slot: usize);
    fn cache_bytes(&self, cache: &Self::Cache) -> usize;
    /// Bytes of cache one position of one sequence takes.
    fn cache_token_bytes(&self, layers: usize, kv_dim: usize) -> usize {
        layers * 2 * kv_dim * 4
    }
    /// Whether `new_cache` allocates every slot's whole context up front (else each slot grows
    /// to what `cache_reserve` asks for).
    fn cache_preallocated(&self) -> bool {
        false
    }

    /// Uploads a step's rows and rotary tables.
    fn begin_step(&self, input: &StepInput<'_>) -> Result<Self::Step>;

    /// x (n, hidden) = rows `token` of the embedding table.
    fn embed(&self, step: &Self::Step, table: &Self::Matrix, x: &mut Self::Act);
    /// out (n, d) = rmsnorm(x (n, d)) * w (d,)
    fn rmsnorm(&self, n: usize, x: &Self::Act, w: &Self::Vector, eps: f64, out: &mut Self::Act);
    /// out (n, rows) = x (n, cols) @ W^T (+ bias)
    fn matmul(&self, n: usize, w: &Self::Matrix, bias: Option<&Self::Vector>, x: &Self::Act, out: &mut Self::Act);
    /// Rotates q (n, heads * head_dim) and k (n, kv_heads * head_dim) with the step's rotary
    /// table `table`.
    fn rope(&self, step: &Self::Step, table: usize, q: &mut Self::Act, k: &mut Self::Act, head_dim: usize);
    /// Writes row i's k and v (n, kv_dim) at (slot, pos) of layer `layer`.
    fn kv_write(&self, step: &Self::Step, cache: &mut Self::Cache, layer: usize, k: &Self::Act, v: &Self::Act);
    /// out (n, heads * head_dim) = causal attention of q over each row's cached positions.
    fn attention(&self, step: &Self::Step, cache: &Self::Cache, layer: usize, shape: AttentionShape, q: &Self::Act, out: &mut Self::Act);
    /// gate (n, d) <- act(gate) * up
    fn gated_act(&self, n: usize, act: Activation, gate: &mut Self::Act, up: &Self::Act);
    /// Every head (head_dim values) of x (n, heads * head_dim) RMS-normed in place with
    /// w (head_dim,): Gemma's q and k norms.
    fn head_rmsnorm(&self, n: usize, x: &mut Self::Act, w: &Self::Vector, eps: f64, head_dim: usize);
    /// x (n, d) *= s
    fn scale(&self, n: usize, x: &mut Self::Act, s: f32);
    /// x (n, d) += y (n, d)
    fn add(&self, n: usize, x: &mut Self::Act, y: &Self::Act);
    /// out (m, d) = rmsnorm of the step's logit rows of x.
    fn rmsnorm_logit_rows(&self, step: &Self::Step, x: &Self::Act, w: &Self::Vector, eps: f64, out: &mut Self::Act);
    /// x[..values.len()] = values, before any op of the step that reads x.
    fn write(&self, x: &mut Self::Act, values: &[f32]) -> Result<()>;
    /// The first `n` rows of `x`, on the host. Finishes all queued work.
    fn read(&self, n: usize, x: &Self::Act) -> Result<Vec<f32>>;

    /// Fused ops (the GPU's path to fewer dispatches and fewer passes over activations).
    /// The defaults compose the primitive ops, so a backend that does not fuse computes the
    /// same function bit for bit.
    ///
    /// out (n, rows) = rmsnorm(x) @ W^T (+ bias), `normed` a scratch (n, cols).
    #[allow(clippy::too_many_arguments)]
    fn norm_matmul(&self, n: usize, x: &Self::Act, norm: &Self::Vector, eps: f64, w: &Self::Matrix, bias: Option<&Self::Vector>, normed: &mut Self::Act, out: &mut Self::Act) {
        self.rmsnorm(n, x, norm, eps, normed);
        self.matmul(n, w, bias, normed, out);
    }
    /// q, k, v (n, *) = rmsnorm(x) @ {Wq, Wk, Wv}^T (+ their biases), `normed` a scratch
    /// (n, cols): the three products of one layer's attention input.
    #[allow(clippy::too_many_arguments)]
    fn norm_qkv(&self, n: usize, x: &Self::Act, norm: &Self::Vector, eps: f64, w: [&Self::Matrix; 3], bias: [Option<&Self::Vector>; 3], normed: &mut Self::Act, q: &mut Self::Act, k: &mut Self::Act, v: &mut Self::Act) {
        self.norm_matmul(n, x, norm, eps, w[0], bias[0], normed, q);
        self.norm_matmul(n, x, norm, eps, w[1], bias[1], normed, k);
        self.norm_matmul(n, x, norm, eps, w[2], bias[2], normed, v);
    }
    /// x (n, rows) += y (n, cols) @ W^T (+ bias), `scratch` (n, rows).
    fn matmul_add(&self, n: usize, w: &Self::Matrix, bias: Option<&Self::Vector>, y: &Self::Act, scratch: &mut Self::Act, x: &mut Self::Act) {
        self.matmul(n, w, bias, y, scratch);
        self.add(n, x, scratch);
    }
    /// gate (n, ffn) = silu(x' @ G^T) * (x' @ U^T) with x' = rmsnorm(x); `normed` (n, hidden)
    /// and `up` (n, ffn) are scratch.
    #[allow(clippy::too_many_arguments)]
    fn norm_gate_up(&self, n: usize, x: &Self::Act, norm: &Self::Vector, eps: f64, gw: &Self::Matrix, uw: &Self::Matrix, normed: &mut Self::Act, gate: &mut Self::Act, up: &mut Self::Act) {
        self.rmsnorm(n, x, norm, eps, normed);
        self.matmul(n, gw, None, normed, gate);
        self.matmul(n, uw, None, normed, up);
        self.gated_act(n, Activation::Silu, gate, up);
    }
    /// Rotates q and k and writes k and v to the cache.
    #[allow(clippy::too_many_arguments)]
    fn rope_kv_write(&self, step: &Self::Step, table: usize, cache: &mut Self::Cache, layer: usize, q: &mut Self::Act, k: &mut Self::Act, v: &Self::Act, head_dim: usize) {
        self.rope(step, table, q, k, head_dim);
        self.kv_write(step, cache, layer, k, v);
    }
}

/// Which backend `backend=` asks for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BackendKind {
    Cpu,
    Gpu,
    /// A hardware GPU when there is one, the CPU otherwise (never a software driver).
    Auto,
}

impl BackendKind {
    pub fn parse(name: &str) -> Result<Self> {
        match name {
            "cpu" => Ok(BackendKind::Cpu),
            "gpu" | "wgpu" | "metal" | "vulkan" => {
                if cfg!(feature = "gpu") {
                    Ok(BackendKind::Gpu)
                } else {
                    Err(EngineError::Backend(
                        name.to_string(),
                        "this engine was built without the `gpu` feature (wgpu); use backend=\"cpu\"".into(),
                    ))
                }
            }
            "auto" => Ok(BackendKind::Auto),
            other => Err(EngineError::InvalidArgument(format!("backend {other:?} is unknown (expected \"cpu\", \"gpu\" or \"auto\")"))),
        }
    }
}
