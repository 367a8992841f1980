//! `config.json` of a Hugging Face LLaMA-family checkpoint, in both styles found in the wild:
//! transformers 4 (`rope_theta`, `rope_scaling`, `torch_dtype`) and transformers 5
//! (`rope_parameters`, `dtype`). Mirrors the file's own field names.

use std::path::{Path, PathBuf};

use serde_json::{Map, Value};

pub use crate::backend::Activation;
use crate::error::{EngineError, Result};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Architecture {
    Llama,
    Mistral,
    Qwen2,
    Gemma3,
}

impl Architecture {
    pub fn hf_name(self) -> &'static str {
        match self {
            Architecture::Llama => "LlamaForCausalLM",
            Architecture::Mistral => "MistralForCausalLM",
            Architecture::Qwen2 => "Qwen2ForCausalLM",
            Architecture::Gemma3 => "Gemma3ForCausalLM",
        }
    }
}

/// How rotary position embeddings are scaled (`rope_type`).
#[derive(Debug, Clone, PartialEq)]
pub enum RopeScaling {
    None,
    /// Positions divided by `factor`.
    Linear { factor: f64 },
    /// Llama 3.x frequency-dependent scaling.
    Llama3 { factor: f64, low_freq_factor: f64, high_freq_factor: f64, original_max_position_embeddings: f64 },
    /// Each pair's frequency divided by its own factor (GGUF's `rope_freqs` tensor).
    Factors(Vec<f64>),
}

#[derive(Debug, Clone)]
pub struct ModelConfig {
    pub architecture: Architecture,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    pub num_key_value_heads: usize,
    pub head_dim: usize,
    pub vocab_size: usize,
    pub max_position_embeddings: usize,
    pub rms_norm_eps: f64,
    pub rope_theta: f64,
    pub rope_scaling: RopeScaling,
    pub tie_word_embeddings: bool,
    /// q/k/v projections carry biases (Qwen2 always; Llama with `attention_bias`).
    pub qkv_bias: bool,
    /// o_proj carries a bias (Llama with `attention_bias`).
    pub o_bias: bool,
    /// Attention sees only the last `sliding_window` positions (Mistral).
    pub sliding_window: Option<usize>,
    pub bos_token_id: Option<u32>,
    pub eos_token_ids: Vec<u32>,
    /// `dtype` / `torch_dtype` as written, for information only: tensors carry their own dtype.
    pub stored_dtype: Option<String>,
    /// Blocks beyond the LLaMA family, as data on the shared decoder (Gemma 3 uses them all).
    pub blocks: Blocks,
}

/// Architecture details the shared decoder switches on. `Blocks::llama(head_dim)` is the
/// LLaMA family: SiLU, no extra norms, 1/sqrt(head_dim) attention scale.
#[derive(Debug, Clone, PartialEq)]
pub struct Blocks {
    pub activation: Activation,
    /// q and k RMS-normed per head before rotation (`self_attn.q_norm`, `self_attn.k_norm`).
    pub qk_norm: bool,
    /// Attention and MLP outputs RMS-normed before the residual add
    /// (`post_attention_layernorm`, `post_feedforward_layernorm`); the MLP's input norm is
    /// then `pre_feedforward_layernorm`.
    pub sandwich_norms: bool,
    /// Embeddings are multiplied by this (Gemma: sqrt(hidden_size)).
    pub embed_scale: Option<f32>,
    /// Added to every RMSNorm weight at load: Gemma checkpoints store w of `x * (1 + w)`.
    pub norm_offset: f32,
    pub attn_scale: f32,
    /// Layers that use `sliding_window` (None: every layer does).
    pub sliding_layers: Option<Vec<bool>>,
    /// Rotary base of the sliding layers when it is their own (Gemma 3's local layers), unscaled.
    pub rope_local_theta: Option<f64>,
}

impl Blocks {
    pub fn llama(head_dim: usize) -> Self {
        Blocks {
            activation: Activation::Silu,
            qk_norm: false,
            sandwich_norms: false,
            embed_scale: None,
            norm_offset: 0.0,
            attn_scale: 1.0 / (head_dim as f32).sqrt(),
            sliding_layers: None,
            rope_local_theta: None,
        }
    }

    /// Gemma 3's blocks, given the per-layer sliding flags, local rotary base and
    /// `query_pre_attn_scalar`; `norm_offset` is 1 for Hugging Face checkpoints and 0 for
    /// GGUF files (whose converter adds the 1 to the stored weights).
    pub fn gemma3(hidden: usize, sliding_layers: Vec<bool>, rope_local_theta: f64, query_pre_attn_scalar: f64, norm_offset: f32) -> Self {
        Blocks {
            activation: Activation::GeluTanh,
            qk_norm: true,
            sandwich_norms: true,
            embed_scale: Some((hidden as f32).sqrt()),
            norm_offset,
            attn_scale: (1.0 / query_pre_attn_scalar.sqrt()) as f32,
            sliding_layers: Some(sliding_layers),
            rope_local_theta: Some(rope_local_theta),
        }
    }
}

/// Gemma 3's default layer pattern: every `pattern`-th layer attends globally, the rest slide.
pub fn gemma3_sliding_layers(layers: usize, pattern: usize) -> Vec<bool> {
    (0..layers).map(|i| pattern == 0 || (i + 1) % pattern != 0).collect()
}

const MAX_DIM: u64 = 1 << 24;
pub const MAX_LAYERS: usize = 1024;

struct Fields<'a> {
    path: &'a Path,
    obj: &'a Map<String, Value>,
}

impl<'a> Fields<'a> {
    fn err(&self, field: &str, message: impl Into<String>) -> EngineError {
        EngineError::field(self.path, field, message)
    }

    fn present(&self, key: &str) -> Option<&'a Value> {
        self.obj.get(key).filter(|v| !v.is_null())
    }

    fn usize_req(&self, key: &str) -> Result<usize> {
        match self.present(key) {
            None => Err(self.err(key, "missing")),
            Some(v) => self.as_usize(key, v),
        }
    }

    fn usize_opt(&self, key: &str) -> Result<Option<usize>> {
        self.present(key).map(|v| self.as_usize(key, v)).transpose()
    }

    fn as_usize(&self, key: &str, v: &Value) -> Result<usize> {
        match v.as_u64() {
            // Every dimension of a real model is far below 2^24; the bound keeps products of
            // two dimensions from overflowing.
            Some(n) if n > 0 && n <= MAX_DIM => Ok(n as usize),
            _ => Err(self.err(key, format!("expected a positive integer up to {MAX_DIM}, got {v}"))),
        }
    }

    /// A number `key` of `obj`, reported as `name` (e.g. `rope_scaling.factor`).
    fn f64_opt(&self, obj: &Map<String, Value>, key: &str, name: &str) -> Result<Option<f64>> {
        match obj.get(key).filter(|v| !v.is_null()) {
            None => Ok(None),
            Some(v) => match v.as_f64() {
                Some(x) if x.is_finite() => Ok(Some(x)),
                _ => Err(self.err(name, format!("expected a number, got {v}"))),
            },
        }
    }

    fn bool_opt(&self, key: &str, default: bool) -> Result<bool> {
        match self.present(key) {
            None => Ok(default),
            Some(Value::Bool(b)) => Ok(*b),
            Some(v) => Err(self.err(key, format!("expected true or false, got {v}"))),
        }
    }

    fn token_ids(&self, key: &str) -> Result<Vec<u32>> {
        token_ids(self.path, key, self.present(key))
    }
}

/// The largest `rms_norm_eps` accepted (models use 1e-6 to 1e-5).
pub const MAX_RMS_NORM_EPS: f64 = 0.1;
/// The largest rope scaling factor accepted (models use up to a few hundred).
pub const MAX_ROPE_FACTOR: f64 = 1e4;

/// A token id or a list of them (`eos_token_id` may be either).
pub fn token_ids(path: &Path, key: &str, v: Option<&Value>) -> Result<Vec<u32>> {
    let bad = |v: &Value| EngineError::field(path, key, format!("expected a token id or a list of them, got {v}"));
    match v {
        None | Some(Value::Null) => Ok(vec![]),
        Some(Value::Array(items)) => items
            .iter()
            .map(|x| x.as_u64().filter(|&n| n <= u32::MAX as u64).map(|n| n as u32).ok_or_else(|| bad(x)))
            .collect(),
        Some(x) => x.as_u64().filter(|&n| n <= u32::MAX as u64).map(|n| vec![n as u32]).ok_or_else(|| bad(x)),
    }
}

pub fn read_json_object(path: &Path) -> Result<Map<String, Value>> {
    let text = std::fs::read_to_string(path).map_err(|e| EngineError::file(path, format!("cannot read: {e}")))?;
    parse_json_object(path, &text)
}

/// The JSON object of file `path` whose text is `text`.
pub fn parse_json_object(path: &Path, text: &str) -> Result<Map<String, Value>> {
    match serde_json::from_str::<Value>(text) {
        Ok(Value::Object(obj)) => Ok(obj),
        Ok(_) => Err(EngineError::file(path, "expected a JSON object")),
        Err(e) => Err(EngineError::file(path, format!("malformed JSON: {e}"))),
    }
}

impl ModelConfig {
    pub fn load(model_dir: &Path) -> Result<Self> {
        let path: PathBuf = model_dir.join("config.json");
        if !path.is_file() {
            return Err(EngineError::file(&path, "missing: a Hugging Face model folder needs config.json"));
        }
        Self::from_object(&path, &read_json_object(&path)?)
    }

    pub fn from_object(path: &Path, obj: &Map<String, Value>) -> Result<Self> {
        let f = Fields { path, obj };
        let architecture = parse_architecture(&f)?;

        let hidden_size = f.usize_req("hidden_size")?;
        let num_attention_heads = f.usize_req("num_attention_heads")?;
        let num_key_value_heads = f.usize_opt("num_key_value_heads")?.unwrap_or(num_attention_heads);
        if num_attention_heads % num_key_value_heads != 0 {
            return Err(f.err(
                "num_key_value_heads",
                format!("{num_key_value_heads} does not divide num_attention_heads = {num_attention_heads}"),
            ));
        }
        let head_dim = match f.usize_opt("head_dim")? {
            Some(d) => d,
            None if hidden_size % num_attention_heads == 0 => hidden_size / num_attention_heads,
            None => return Err(f.err("head_dim", "missing, and hidden_size is not a multiple of num_attention_heads")),
        };
        if head_dim % 2 != 0 {
            return Err(f.err("head_dim", format!("{head_dim} is odd; rotary embeddings need an even head_dim")));
        }
        let gemma = architecture == Architecture::Gemma3;
        let act_key = if gemma && f.present("hidden_activation").is_some() { "hidden_activation" } else { "hidden_act" };
        let want_act = if gemma { "gelu_pytorch_tanh" } else { "silu" };
        if let Some(act) = f.present(act_key) {
            if act.as_str() != Some(want_act) {
                return Err(f.err(act_key, format!("{act} is not supported for {} (only {want_act:?})", architecture.hf_name())));
            }
        }
        if f.bool_opt("mlp_bias", false)? {
            return Err(f.err("mlp_bias", "MLP biases are not supported"));
        }
        let attention_bias = f.bool_opt("attention_bias", false)?;
        let (qkv_bias, o_bias) = match architecture {
            Architecture::Qwen2 => (true, false),
            _ => (attention_bias, attention_bias),
        };
        let sliding_window = match architecture {
            Architecture::Mistral | Architecture::Gemma3 => f.usize_opt("sliding_window")?,
            Architecture::Qwen2 if f.bool_opt("use_sliding_window", false)? => {
                return Err(f.err("use_sliding_window", "Qwen2 sliding-window attention is not supported"))
            }
            _ => None,
        };
        let num_hidden_layers = f.usize_req("num_hidden_layers")?;
        if num_hidden_layers > MAX_LAYERS {
            // Per-layer tables are sized by this before any weight is read.
            return Err(f.err("num_hidden_layers", format!("{num_hidden_layers} layers; at most {MAX_LAYERS} are read (models have a few hundred at most)")));
        }
        let (rope_theta, rope_scaling, blocks) = if gemma {
            gemma3_blocks(&f, hidden_size, head_dim, num_hidden_layers)?
        } else {
            let (theta, scaling) = parse_rope(&f, None)?;
            (theta, scaling, Blocks::llama(head_dim))
        };
        let rms_norm_eps = f.f64_opt(obj, "rms_norm_eps", "rms_norm_eps")?.unwrap_or(1e-6);
        if rms_norm_eps <= 0.0 || rms_norm_eps > MAX_RMS_NORM_EPS {
            // models use 1e-6 .. 1e-5; an epsilon near the activations' scale erases the norm
            return Err(f.err("rms_norm_eps", format!("must be positive and at most {MAX_RMS_NORM_EPS}, got {rms_norm_eps:e}")));
        }
        let stored_dtype = ["dtype", "torch_dtype"]
            .iter()
            .find_map(|k| f.present(k).and_then(|v| v.as_str()).map(str::to_string));
        Ok(ModelConfig {
            architecture,
            hidden_size,
            intermediate_size: f.usize_req("intermediate_size")?,
            num_hidden_layers,
            num_attention_heads,
            num_key_value_heads,
            head_dim,
            vocab_size: f.usize_req("vocab_size")?,
            // transformers' defaults when the field is absent
            max_position_embeddings: f.usize_opt("max_position_embeddings")?.unwrap_or(match architecture {
                Architecture::Llama => 2048,
                Architecture::Mistral => 131072,
                Architecture::Qwen2 => 32768,
                Architecture::Gemma3 => 131072,
            }),
            rms_norm_eps,
            rope_theta,
            rope_scaling,
            tie_word_embeddings: f.bool_opt("tie_word_embeddings", gemma)?,
            qkv_bias,
            o_bias,
            sliding_window,
            bos_token_id: f.token_ids("bos_token_id")?.first().copied(),
            eos_token_ids: f.token_ids("eos_token_id")?,
            stored_dtype,
            blocks,
        })
    }

    /// The sliding window of layer `l`, if it has one.
    pub fn layer_window(&self, l: usize) -> Option<usize> {
        match &self.blocks.sliding_layers {
            Some(sliding) if !sliding[l] => None,
            _ => self.sliding_window,
        }
    }

    /// Which rotary table layer `l` reads: 0 (the model's), or 1 (the sliding layers' own).
    pub fn layer_rope_table(&self, l: usize) -> usize {
        usize::from(self.blocks.rope_local_theta.is_some() && self.layer_window(l).is_some())
    }

    pub fn q_dim(&self) -> usize {
        self.num_attention_heads * self.head_dim
    }

    pub fn kv_dim(&self) -> usize {
        self.num_key_value_heads * self.head_dim
    }
}

fn parse_architecture(f: &Fields) -> Result<Architecture> {
    let from_name = |name: &str| match name {
        "LlamaForCausalLM" => Some(Architecture::Llama),
        "MistralForCausalLM" => Some(Architecture::Mistral),
        "Qwen2ForCausalLM" => Some(Architecture::Qwen2),
        "Gemma3ForCausalLM" => Some(Architecture::Gemma3),
        _ => None,
    };
    match f.present("architectures") {
        Some(Value::Array(names)) if !names.is_empty() => {
            let name = names[0].as_str().ok_or_else(|| f.err("architectures", "expected a list of strings"))?;
            from_name(name).ok_or_else(|| {
                f.err(
                    "architectures",
                    format!("{name:?} is not supported (supported: LlamaForCausalLM, MistralForCausalLM, Qwen2ForCausalLM, Gemma3ForCausalLM)"),
                )
            })
        }
        Some(v) => Err(f.err("architectures", format!("expected a non-empty list, got {v}"))),
        None => match f.present("model_type").and_then(|v| v.as_str()) {
            Some("llama") => Ok(Architecture::Llama),
            Some("mistral") => Ok(Architecture::Mistral),
            Some("qwen2") => Ok(Architecture::Qwen2),
            Some("gemma3_text") => Ok(Architecture::Gemma3),
            Some(other) => Err(f.err("model_type", format!("{other:?} is not supported (llama, mistral, qwen2, gemma3_text)"))),
            None => Err(f.err("architectures", "missing (and no model_type)")),
        },
    }
}

/// Rope settings: transformers 5 keeps them in `rope_parameters`; transformers 4 in
/// `rope_theta` plus an optional `rope_scaling` object.
fn parse_rope(f: &Fields, layer_type: Option<&str>) -> Result<(f64, RopeScaling)> {
    let (section_name, section) = match (f.present("rope_parameters"), f.present("rope_scaling")) {
        // transformers 5 keeps one section per layer type for models that have several
        (Some(Value::Object(p)), _) if layer_type.is_some_and(|t| p.contains_key(t)) => {
            let t = layer_type.unwrap_or_default();
            match &p[t] {
                Value::Object(sub) => (if t == "full_attention" { "rope_parameters.full_attention" } else { "rope_parameters.sliding_attention" }, Some(sub)),
                v => return Err(f.err(&format!("rope_parameters.{t}"), format!("expected an object, got {v}"))),
            }
        }
        (Some(Value::Object(p)), _) => ("rope_parameters", Some(p)),
        (Some(v), _) => return Err(f.err("rope_parameters", format!("expected an object, got {v}"))),
        (None, Some(Value::Object(s))) => ("rope_scaling", Some(s)),
        (None, Some(v)) => return Err(f.err("rope_scaling", format!("expected an object or null, got {v}"))),
        (None, None) => ("rope_scaling", None),
    };
    let in_section = format!("{section_name}.rope_theta");
    let (theta_name, theta) = match section.and_then(|s| f.f64_opt(s, "rope_theta", &in_section).transpose()) {
        Some(t) => (in_section.as_str(), t?),
        None => ("rope_theta", f.f64_opt(f.obj, "rope_theta", "rope_theta")?.unwrap_or(10000.0)),
    };
    check_rope_base(f, theta_name, theta)?;
    let Some(s) = section else { return Ok((theta, RopeScaling::None)) };
    let kind = s.get("rope_type").or_else(|| s.get("type")).and_then(|v| v.as_str()).unwrap_or("default");
    // A positive number of the rope section, named with its section in errors. Factors past
    // MAX_ROPE_FACTOR are a broken file, not a model (they would stretch positions beyond any
    // trained range and flatten every angle).
    let num = |key: &str| -> Result<f64> {
        let name = format!("{section_name}.{key}");
        match f.f64_opt(s, key, &name)? {
            None => Err(f.err(&name, format!("missing for rope_type {kind:?}"))),
            Some(x) if x <= 0.0 => Err(f.err(&name, format!("must be positive, got {x}"))),
            // As transformers validates it: below 1 the scaling compresses positions instead,
            // and a tiny factor makes every frequency infinite.
            Some(x) if key == "factor" && x < 1.0 => Err(f.err(&name, format!("must be at least 1, got {x:e}"))),
            Some(x) if key.ends_with("factor") && x > MAX_ROPE_FACTOR => Err(f.err(&name, format!("{x:e} is beyond any model's scaling (at most {MAX_ROPE_FACTOR})"))),
            Some(x) => Ok(x),
        }
    };
    let scaling = match kind {
        "default" => RopeScaling::None,
        "linear" => RopeScaling::Linear { factor: num("factor")? },
        "llama3" => {
            let (low, high) = (num("low_freq_factor")?, num("high_freq_factor")?);
            if high <= low {
                return Err(f.err(
                    &format!("{section_name}.high_freq_factor"),
                    format!("must be greater than low_freq_factor ({high} <= {low})"),
                ));
            }
            RopeScaling::Llama3 {
                factor: num("factor")?,
                low_freq_factor: low,
                high_freq_factor: high,
                original_max_position_embeddings: num("original_max_position_embeddings")?,
            }
        }
        other => {
            return Err(f.err(
                &format!("{section_name}.rope_type"),
                format!("{other:?} is not supported (default, linear, llama3)"),
            ))
        }
    };
    Ok((theta, scaling))
}

/// A rotary base below 1 gives frequencies above 1 that grow without bound as it nears 0
/// (infinite, then NaN angles); every model uses thousands or more.
fn check_rope_base(f: &Fields, name: &str, theta: f64) -> Result<()> {
    if theta < 1.0 {
        return Err(f.err(name, format!("must be at least 1, got {theta:e}")));
    }
    Ok(())
}

/// Gemma 3 (`Gemma3ForCausalLM`, model_type `gemma3_text`): global layers rotate with
/// `rope_theta` (and any scaling), sliding layers with `rope_local_base_freq`.
fn gemma3_blocks(f: &Fields, hidden: usize, head_dim: usize, layers: usize) -> Result<(f64, RopeScaling, Blocks)> {
    for key in ["final_logit_softcapping", "attn_logit_softcapping"] {
        if let Some(v) = f.present(key) {
            return Err(f.err(key, format!("{v}: logit soft-capping is not supported (Gemma 3 does not use it)")));
        }
    }
    if f.bool_opt("use_bidirectional_attention", false)? {
        return Err(f.err("use_bidirectional_attention", "bidirectional attention is not supported"));
    }
    let sliding = match f.present("layer_types") {
        Some(Value::Array(types)) => {
            if types.len() != layers {
                return Err(f.err("layer_types", format!("has {} entries for {layers} layers", types.len())));
            }
            types
                .iter()
                .enumerate()
                .map(|(i, t)| match t.as_str() {
                    Some("sliding_attention") => Ok(true),
                    Some("full_attention") => Ok(false),
                    _ => Err(f.err(&format!("layer_types[{i}]"), format!("{t} is not \"sliding_attention\" or \"full_attention\""))),
                })
                .collect::<Result<Vec<bool>>>()?
        }
        Some(v) => return Err(f.err("layer_types", format!("expected a list, got {v}"))),
        None => {
            let key = if f.present("sliding_window_pattern").is_some() { "sliding_window_pattern" } else { "_sliding_window_pattern" };
            gemma3_sliding_layers(layers, f.usize_opt(key)?.unwrap_or(6))
        }
    };
    let (theta, scaling) = parse_rope(f, Some("full_attention"))?;
    let local_theta = match f.present("rope_parameters") {
        Some(Value::Object(p)) if p.contains_key("sliding_attention") => parse_rope(f, Some("sliding_attention"))?.0,
        _ => f.f64_opt(f.obj, "rope_local_base_freq", "rope_local_base_freq")?.unwrap_or(10000.0),
    };
    check_rope_base(f, "rope_local_base_freq", local_theta)?;
    let scalar = f.f64_opt(f.obj, "query_pre_attn_scalar", "query_pre_attn_scalar")?.unwrap_or(head_dim as f64);
    // The attention scale is 1/sqrt(scalar) in f32: a tiny scalar makes it infinite, a huge one 0.
    if !(1.0..=MAX_DIM as f64).contains(&scalar) {
        return Err(f.err("query_pre_attn_scalar", format!("must be between 1 and {MAX_DIM}, got {scalar:e}")));
    }
    Ok((theta, scaling, Blocks::gemma3(hidden, sliding, local_theta, scalar, 1.0)))
}
