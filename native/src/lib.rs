//! upg-batch's native engine. This file holds the Python bindings only: values in, values
//! out, the GIL released while the engine computes, and every engine error turned into
//! `upg_batch.EngineError` here and nowhere else.

pub mod backend;
pub mod engine;
pub mod error;
/// Mutational fuzzing of the model-file loaders (the fuzz examples and bounded tests).
#[doc(hidden)]
pub mod fuzzing;
pub mod gguf;
pub mod model;
pub mod quant;
pub mod tensor;

// The bounded fuzz tests check each input's allocations; counting is per thread.
#[cfg(test)]
#[global_allocator]
static ALLOC: fuzzing::alloc::Counting = fuzzing::alloc::Counting;

use std::path::PathBuf;

use pyo3::create_exception;
use pyo3::exceptions::PyException;
use pyo3::prelude::*;
use pyo3::types::{PyBytes, PyDict};

use engine::sampler::SamplingParams;
use engine::stats::Stats;
use engine::{Engine, EngineOptions, Prompt};

create_exception!(upg_batch._native, EngineError, PyException, "An error of the native engine: bad model files, bad input, an unavailable backend.");

fn to_py(e: error::EngineError) -> PyErr {
    EngineError::new_err(e.to_string())
}

/// (max_tokens, temperature, top_k, top_p, min_p, seed, stop, stop_token_ids, ignore_eos)
type NativeParams = (usize, f64, usize, f64, f64, Option<u64>, Vec<String>, Vec<u32>, bool, Option<usize>);
/// (token_ids, text, finish_reason, prompt_tokens, ttft_s, latency_s, logprobs: per token
/// (its log-probability, [(token, log-probability)] of the top k) or None)
type NativeOutput = (Vec<u32>, String, &'static str, usize, f64, f64, Option<Vec<(f32, Vec<(u32, f32)>)>>);

#[derive(FromPyObject)]
enum PyPrompt {
    Text(String),
    Ids(Vec<u32>),
}

#[pyclass(frozen, module = "upg_batch._native")]
struct NativeEngine {
    inner: Engine,
}

#[pymethods]
impl NativeEngine {
    #[new]
    #[pyo3(signature = (model_dir, backend, weights, threads, max_batch, context, fused = true, activations = String::new(), kv_cache = String::new(), kv_cache_bytes = None))]
    #[allow(clippy::too_many_arguments)]
    fn new(
        py: Python<'_>,
        model_dir: PathBuf,
        backend: String,
        weights: String,
        threads: Option<usize>,
        max_batch: usize,
        context: Option<usize>,
        fused: bool,
        activations: String,
        kv_cache: String,
        kv_cache_bytes: Option<usize>,
    ) -> PyResult<Self> {
        let opts = EngineOptions { backend, weights, threads, max_batch, context, fused, activations, kv_cache, kv_cache_bytes };
        let inner = py.allow_threads(|| Engine::load(&model_dir, opts)).map_err(to_py)?;
        Ok(NativeEngine { inner })
    }

    fn tokenize(&self, py: Python<'_>, text: String) -> PyResult<Vec<u32>> {
        py.allow_threads(|| self.inner.tokenize(&text)).map_err(to_py)
    }

    fn detokenize(&self, py: Python<'_>, ids: Vec<u32>) -> PyResult<String> {
        py.allow_threads(|| self.inner.detokenize(&ids)).map_err(to_py)
    }

    /// (float32 bytes, rows, vocab)
    fn logits<'py>(&self, py: Python<'py>, ids: Vec<u32>) -> PyResult<(Bound<'py, PyBytes>, usize, usize)> {
        let values = py.allow_threads(|| self.inner.logits(&ids)).map_err(to_py)?;
        let bytes: &[u8] = bytemuck::cast_slice(&values);
        Ok((PyBytes::new(py, bytes), ids.len(), self.inner.model.cfg().vocab_size))
    }

    fn generate(&self, py: Python<'_>, prompts: Vec<PyPrompt>, params: Vec<NativeParams>) -> PyResult<Vec<NativeOutput>> {
        let prompts = prompts
            .into_iter()
            .map(|p| match p {
                PyPrompt::Text(t) => Prompt::Text(t),
                PyPrompt::Ids(ids) => Prompt::Ids(ids),
            })
            .collect();
        let params = params
            .into_iter()
            .map(|(max_tokens, temperature, top_k, top_p, min_p, seed, stop, stop_token_ids, ignore_eos, logprobs)| SamplingParams {
                max_tokens,
                temperature,
                top_k,
                top_p,
                min_p,
                seed,
                stop,
                stop_token_ids,
                ignore_eos,
                logprobs,
            })
            .collect();
        let outputs = py.allow_threads(|| self.inner.generate(prompts, params)).map_err(to_py)?;
        Ok(outputs.into_iter().map(|o| (o.token_ids, o.text, o.finish_reason.as_str(), o.prompt_tokens, o.ttft_s, o.latency_s, o.logprobs)).collect())
    }

    fn info<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyDict>> {
        let e = &self.inner;
        let c = e.model.cfg();
        let d = PyDict::new(py);
        d.set_item("architecture", c.architecture.hf_name())?;
        d.set_item("parameters", e.model.parameter_count())?;
        d.set_item("layers", c.num_hidden_layers)?;
        d.set_item("hidden_size", c.hidden_size)?;
        d.set_item("heads", c.num_attention_heads)?;
        d.set_item("kv_heads", c.num_key_value_heads)?;
        d.set_item("head_dim", c.head_dim)?;
        d.set_item("intermediate_size", c.intermediate_size)?;
        d.set_item("vocab", c.vocab_size)?;
        d.set_item("context", e.context)?;
        d.set_item("max_position_embeddings", c.max_position_embeddings)?;
        d.set_item("backend", e.model.backend_name())?;
        d.set_item("weights", e.model.scheme().name())?;
        d.set_item("fused", e.model.fused())?;
        d.set_item("activations", e.model.activations())?;
        d.set_item("kv_cache", e.model.kv_cache())?;
        d.set_item("kv_cache_bytes", e.kv_budget)?;
        d.set_item("kv_bytes_per_token", e.kv_token_bytes())?;
        d.set_item("weight_bytes", e.model.weight_bytes())?;
        d.set_item("checkpoint_matrix_bytes", e.model.checkpoint_matrix_bytes())?;
        d.set_item("weight_fallbacks", e.model.weight_fallbacks())?;
        d.set_item("stored_dtype", c.stored_dtype.clone())?;
        d.set_item("max_batch", e.max_batch)?;
        d.set_item("threads", e.threads)?;
        d.set_item("eos_token_ids", e.eos_token_ids.clone())?;
        d.set_item("bos_token_id", c.bos_token_id)?;
        d.set_item("simd", backend::cpu::matmul::simd_name())?;
        if let Some((template, special)) = &e.chat {
            // A GGUF file's chat template and special-token texts (None: the file has none).
            d.set_item("chat_template", template.clone())?;
            let tokens = PyDict::new(py);
            for (k, v) in special {
                tokens.set_item(k, v)?;
            }
            d.set_item("special_tokens", tokens)?;
        }
        if let Some((adapter, api, device_type, dispatches, checks)) = e.model.gpu_info() {
            d.set_item("adapter", adapter)?;
            d.set_item("gpu_api", api)?;
            d.set_item("gpu_device_type", device_type)?;
            // Dispatches of the last forward step (0 before the first one).
            d.set_item("dispatches_per_step", dispatches)?;
            // What wgpu compiled into the kernels (UPG_BATCH_GPU_SHADER_CHECKS).
            d.set_item("gpu_shader_checks", checks)?;
        }
        if let Some((steps, dispatches, encode, wall, gpu)) = e.model.gpu_profile() {
            // Totals since load, for benchmarks: CPU time recording steps, wall time from a
            // step's first dispatch to its results on the host, GPU time of the steps' passes
            // (timestamp queries; None where the adapter has none).
            let p = PyDict::new(py);
            p.set_item("steps", steps)?;
            p.set_item("dispatches", dispatches)?;
            p.set_item("encode_s", encode)?;
            p.set_item("wall_s", wall)?;
            p.set_item("gpu_s", gpu)?;
            // With UPG_BATCH_GPU_PROFILE_KERNELS=1: "kernel GXxGY" -> (dispatches, GPU seconds),
            // each dispatch timed in its own pass.
            let k = PyDict::new(py);
            for (name, count, seconds) in e.model.gpu_kernel_times() {
                k.set_item(name, (count, seconds))?;
            }
            p.set_item("kernels", k)?;
            d.set_item("gpu_profile", p)?;
        }
        Ok(d)
    }

    fn stats<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyDict>> {
        let e = &self.inner;
        let s = &e.stats;
        let d = PyDict::new(py);
        let capacity = (e.max_batch * e.context) as u64;
        let kv_tokens = Stats::get(&s.kv_cache_tokens);
        d.set_item("prompt_tokens_total", Stats::get(&s.prompt_tokens_total))?;
        d.set_item("generation_tokens_total", Stats::get(&s.generation_tokens_total))?;
        d.set_item("steps_total", Stats::get(&s.steps_total))?;
        d.set_item("running_sequences", Stats::get(&s.running_sequences))?;
        d.set_item("waiting_sequences", Stats::get(&s.waiting_sequences))?;
        d.set_item("max_batch", e.max_batch)?;
        d.set_item("kv_cache_tokens", kv_tokens)?;
        d.set_item("kv_cache_capacity_tokens", capacity)?;
        d.set_item("kv_cache_usage_ratio", kv_tokens as f64 / capacity as f64)?;
        d.set_item("memory_bytes", e.memory_bytes())?;
        d.set_item("kv_cache_bytes", Stats::get(&s.kv_cache_bytes))?;
        d.set_item("kv_cache_peak_bytes", Stats::get(&s.kv_cache_peak_bytes))?;
        Ok(d)
    }
}

/// Memory read bandwidth of this machine in bytes/s: the best of `repeats` parallel reads
/// of a `bytes`-sized buffer on `threads` threads (for benchmarks' ceilings).
#[pyfunction]
#[pyo3(signature = (bytes = 1 << 30, threads = 1, repeats = 5))]
fn measure_read_bandwidth(py: Python<'_>, bytes: usize, threads: usize, repeats: usize) -> f64 {
    py.allow_threads(|| backend::cpu::membench::read_bandwidth(bytes, threads, repeats))
}

fn block_format(name: &str) -> PyResult<tensor::WeightFormat> {
    match tensor::WeightFormat::parse(name) {
        Some(f) if !f.is_plain() => Ok(f),
        _ => Err(pyo3::exceptions::PyValueError::new_err(format!("format {name:?} is not a block format (q8_0, q4_0, q5_0, q4_k, q6_k)"))),
    }
}

/// A GGUF file's chat template (None if it has none) and special-token texts (bos_token,
/// eos_token, ...), read from its metadata without loading the model.
/// The machine's f32 multiply-add peak in FLOP/s on `threads` threads (benchmarks' ceiling for
/// compute-bound products).
#[pyfunction]
#[pyo3(signature = (threads = 1))]
fn measure_fma_peak(py: Python<'_>, threads: usize) -> f64 {
    py.allow_threads(|| backend::cpu::membench::fma_peak(threads))
}

#[pyfunction]
fn gguf_chat_template(py: Python<'_>, path: PathBuf) -> PyResult<(Option<String>, Vec<(String, String)>)> {
    py.allow_threads(|| -> error::Result<_> {
        let file = gguf::reader::GgufFile::open(&path)?;
        let meta = &file.metadata;
        let template = meta.str_opt("tokenizer.chat_template")?.map(str::to_string);
        let tokens = meta.str_array_opt("tokenizer.ggml.tokens")?.unwrap_or_default();
        let mut special = Vec::new();
        for (name, key) in [("bos_token", "bos"), ("eos_token", "eos"), ("unk_token", "unknown"), ("pad_token", "padding")] {
            if let Some(id) = meta.usize_opt(&format!("tokenizer.ggml.{key}_token_id"))? {
                if let Some(text) = tokens.get(id) {
                    special.push((name.to_string(), text.to_string()));
                }
            }
        }
        Ok((template, special))
    })
    .map_err(to_py)
}

/// A GGUF file's tokenizer (built from its metadata as the engine builds it) as the
/// tokenizer.json of a Hugging Face folder.
#[pyfunction]
fn gguf_tokenizer_json(py: Python<'_>, path: PathBuf) -> PyResult<String> {
    py.allow_threads(|| -> error::Result<_> {
        let file = gguf::reader::GgufFile::open(&path)?;
        let built = gguf::tokenizer::from_metadata(&file.metadata)?;
        built.tokenizer.to_string(false).map_err(|e| error::EngineError::InvalidArgument(format!("{}: cannot write the tokenizer as JSON: {e}", path.display())))
    })
    .map_err(to_py)
}

/// The blocks (GGUF/ggml layout) of `values`, little-endian f32 bytes whose count is a whole
/// number of the format's blocks.
#[pyfunction]
fn quantize<'py>(py: Python<'py>, values: &[u8], format: &str) -> PyResult<Bound<'py, pyo3::types::PyBytes>> {
    let f = block_format(format)?;
    let (weights, _) = f.block();
    if values.len() % 4 != 0 || (values.len() / 4) % weights != 0 {
        return Err(pyo3::exceptions::PyValueError::new_err(format!("{format} needs whole blocks of {weights} f32 values")));
    }
    let v: Vec<f32> = values.chunks_exact(4).map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]])).collect();
    let out = py.allow_threads(|| crate::with_block_format!(f, F => quant::quantize::<F>(&v)));
    Ok(pyo3::types::PyBytes::new(py, &out))
}

/// The weights of whole blocks of `format`, as little-endian f32 bytes.
#[pyfunction]
fn dequantize<'py>(py: Python<'py>, blocks: &[u8], format: &str) -> PyResult<Bound<'py, pyo3::types::PyBytes>> {
    let f = block_format(format)?;
    let (_, bytes) = f.block();
    if blocks.len() % bytes != 0 {
        return Err(pyo3::exceptions::PyValueError::new_err(format!("{format} blocks are {bytes} bytes; got {}", blocks.len())));
    }
    let v = crate::with_block_format!(f, F => quant::dequantize::<F>(blocks));
    Ok(pyo3::types::PyBytes::new(py, bytemuck::cast_slice(&v)))
}

/// `data` (little-endian `dtype` values: f32, f16 or bf16) in `format` (f32, f16, bf16 or a
/// block format whose blocks divide the rows of `cols`), converted exactly as the engine
/// converts a checkpoint matrix it loads in that format.
#[pyfunction]
fn quantize_tensor<'py>(py: Python<'py>, data: &[u8], dtype: &str, cols: usize, format: &str) -> PyResult<Bound<'py, PyBytes>> {
    let value_err = |m: String| pyo3::exceptions::PyValueError::new_err(m);
    let source = tensor::DType::parse(dtype).filter(|d| d.is_plain()).ok_or_else(|| value_err(format!("dtype {dtype:?} is not one of f32, f16, bf16")))?;
    let target =
        tensor::WeightFormat::parse(format).ok_or_else(|| value_err(format!("format {format:?} is unknown (f32, f16, bf16, q8_0, q4_0, q5_0, q4_k, q6_k)")))?;
    let size = source.block().1;
    if cols == 0 || data.len() % (size * cols) != 0 {
        return Err(value_err(format!("{} bytes are not whole rows of {cols} {dtype} values", data.len())));
    }
    if !target.fits_row(cols) {
        return Err(value_err(format!("rows of {cols} values are not whole {format} blocks of {}", target.block().0)));
    }
    let rows = data.len() / (size * cols);
    let shape = [rows, cols];
    let map: tensor::SharedBytes = std::sync::Arc::new(data.to_vec());
    let out = py.allow_threads(|| {
        let t = tensor::HostTensor { name: "", dtype: source, shape: &shape, map: &map, start: 0, end: data.len() };
        t.to_format_bytes(target)
    });
    Ok(PyBytes::new(py, &out))
}

/// The format the engine holds checkpoint matrix `name` (Hugging Face names) in under the
/// `weights=` scheme `scheme`, for a model of `layers` layers (`tied`: the embedding is the
/// output matrix) whose file stores it as `stored` with rows of `cols` values; and whether
/// that is the f16 fallback for rows that are not whole blocks.
#[pyfunction]
fn weight_format(name: &str, scheme: &str, layers: usize, tied: bool, stored: &str, cols: usize) -> PyResult<(&'static str, bool)> {
    let value_err = |m: String| pyo3::exceptions::PyValueError::new_err(m);
    let s = model::scheme::WeightScheme::parse(scheme).ok_or_else(|| value_err(format!("weights {scheme:?} is unknown")))?;
    let stored = tensor::DType::parse(stored).ok_or_else(|| value_err(format!("stored format {stored:?} is unknown")))?;
    let (f, fell_back) = s.held_format(name, layers, tied, stored, cols);
    Ok((f.name(), fell_back))
}

/// The pre-tokenizer (tokenizer.json's JSON) the engine builds for a GGUF file whose
/// `tokenizer.ggml.pre` is `pre`; None for a name it does not know.
#[pyfunction]
fn gguf_pre_tokenizer(pre: &str) -> Option<String> {
    gguf::tokenizer_bpe::pre_tokenizer(pre).map(|v| v.to_string())
}

/// Streaming read bandwidth of the GPU in bytes/s through a plain WGSL kernel, and the
/// adapter's name (the adapter the `gpu` backend would use).
#[pyfunction]
#[pyo3(signature = (bytes = 1 << 30, repeats = 10))]
fn measure_gpu_read_bandwidth(py: Python<'_>, bytes: u64, repeats: u32) -> PyResult<(f64, String)> {
    #[cfg(feature = "gpu")]
    {
        py.allow_threads(|| {
            let b = backend::wgpu::WgpuBackend::new(false)?;
            Ok((b.read_bandwidth(bytes, repeats)?, b.adapter_name()))
        })
        .map_err(to_py)
    }
    #[cfg(not(feature = "gpu"))]
    {
        let _ = (py, bytes, repeats);
        Err(to_py(error::EngineError::Backend("gpu".into(), "built without the `gpu` feature".into())))
    }
}

#[pymodule(name = "_native")]
fn native_module(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add("EngineError", m.py().get_type::<EngineError>())?;
    m.add_class::<NativeEngine>()?;
    m.add_function(wrap_pyfunction!(measure_read_bandwidth, m)?)?;
    m.add_function(wrap_pyfunction!(measure_fma_peak, m)?)?;
    m.add_function(wrap_pyfunction!(quantize, m)?)?;
    m.add_function(wrap_pyfunction!(gguf_chat_template, m)?)?;
    m.add_function(wrap_pyfunction!(gguf_tokenizer_json, m)?)?;
    m.add_function(wrap_pyfunction!(dequantize, m)?)?;
    m.add_function(wrap_pyfunction!(quantize_tensor, m)?)?;
    m.add_function(wrap_pyfunction!(weight_format, m)?)?;
    m.add_function(wrap_pyfunction!(gguf_pre_tokenizer, m)?)?;
    m.add_function(wrap_pyfunction!(measure_gpu_read_bandwidth, m)?)?;
    Ok(())
}
