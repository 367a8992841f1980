//! `config.json` of a Hugging Face LLaMA-family checkpoint, in both styles found in the wild:
//! transformers 4 (`rope_theta`, `rope_scaling`, `torch_dtype`) and transformers 5
//! (`rope_parameters`, `dtype`). Mirrors the file's own field names.

use std::path::{Path, PathBuf};

use serde_json::{Map, Value};

use crate::error::{EngineError, Result};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Architecture {
    Llama,
    Mistral,
    Qwen2,
}

impl Architecture {
    pub fn hf_name(self) -> &'static str {
        match self {
            Architecture::Llama => "LlamaForCausalLM",
            Architecture::Mistral => "MistralForCausalLM",
            Architecture::Qwen2 => "Qwen2ForCausalLM",
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
}

const MAX_DIM: u64 = 1 << 24;

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
    match serde_json::from_str::<Value>(&text) {
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
        if let Some(act) = f.present("hidden_act") {
            if act.as_str() != Some("silu") {
                return Err(f.err("hidden_act", format!("{act} is not supported (only \"silu\")")));
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
            Architecture::Mistral => f.usize_opt("sliding_window")?,
            Architecture::Qwen2 if f.bool_opt("use_sliding_window", false)? => {
                return Err(f.err("use_sliding_window", "Qwen2 sliding-window attention is not supported"))
            }
            _ => None,
        };
        let (rope_theta, rope_scaling) = parse_rope(&f)?;
        let rms_norm_eps = f.f64_opt(obj, "rms_norm_eps", "rms_norm_eps")?.unwrap_or(1e-6);
        if rms_norm_eps <= 0.0 {
            return Err(f.err("rms_norm_eps", "must be positive"));
        }
        let stored_dtype = ["dtype", "torch_dtype"]
            .iter()
            .find_map(|k| f.present(k).and_then(|v| v.as_str()).map(str::to_string));
        Ok(ModelConfig {
            architecture,
            hidden_size,
            intermediate_size: f.usize_req("intermediate_size")?,
            num_hidden_layers: f.usize_req("num_hidden_layers")?,
            num_attention_heads,
            num_key_value_heads,
            head_dim,
            vocab_size: f.usize_req("vocab_size")?,
            // transformers' defaults when the field is absent
            max_position_embeddings: f.usize_opt("max_position_embeddings")?.unwrap_or(match architecture {
                Architecture::Llama => 2048,
                Architecture::Mistral => 131072,
                Architecture::Qwen2 => 32768,
            }),
            rms_norm_eps,
            rope_theta,
            rope_scaling,
            tie_word_embeddings: f.bool_opt("tie_word_embeddings", false)?,
            qkv_bias,
            o_bias,
            sliding_window,
            bos_token_id: f.token_ids("bos_token_id")?.first().copied(),
            eos_token_ids: f.token_ids("eos_token_id")?,
            stored_dtype,
        })
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
        _ => None,
    };
    match f.present("architectures") {
        Some(Value::Array(names)) if !names.is_empty() => {
            let name = names[0].as_str().ok_or_else(|| f.err("architectures", "expected a list of strings"))?;
            from_name(name).ok_or_else(|| {
                f.err(
                    "architectures",
                    format!("{name:?} is not supported (supported: LlamaForCausalLM, MistralForCausalLM, Qwen2ForCausalLM)"),
                )
            })
        }
        Some(v) => Err(f.err("architectures", format!("expected a non-empty list, got {v}"))),
        None => match f.present("model_type").and_then(|v| v.as_str()) {
            Some("llama") => Ok(Architecture::Llama),
            Some("mistral") => Ok(Architecture::Mistral),
            Some("qwen2") => Ok(Architecture::Qwen2),
            Some(other) => Err(f.err("model_type", format!("{other:?} is not supported (llama, mistral, qwen2)"))),
            None => Err(f.err("architectures", "missing (and no model_type)")),
        },
    }
}

/// Rope settings: transformers 5 keeps them in `rope_parameters`; transformers 4 in
/// `rope_theta` plus an optional `rope_scaling` object.
fn parse_rope(f: &Fields) -> Result<(f64, RopeScaling)> {
    let (section_name, section) = match (f.present("rope_parameters"), f.present("rope_scaling")) {
        (Some(Value::Object(p)), _) => ("rope_parameters", Some(p)),
        (Some(v), _) => return Err(f.err("rope_parameters", format!("expected an object, got {v}"))),
        (None, Some(Value::Object(s))) => ("rope_scaling", Some(s)),
        (None, Some(v)) => return Err(f.err("rope_scaling", format!("expected an object or null, got {v}"))),
        (None, None) => ("rope_scaling", None),
    };
    let theta = match section.and_then(|s| f.f64_opt(s, "rope_theta", &format!("{section_name}.rope_theta")).transpose()) {
        Some(t) => t?,
        None => f.f64_opt(f.obj, "rope_theta", "rope_theta")?.unwrap_or(10000.0),
    };
    if theta <= 0.0 {
        return Err(f.err("rope_theta", "must be positive"));
    }
    let Some(s) = section else { return Ok((theta, RopeScaling::None)) };
    let kind = s.get("rope_type").or_else(|| s.get("type")).and_then(|v| v.as_str()).unwrap_or("default");
    // A positive number of the rope section, named with its section in errors.
    let num = |key: &str| -> Result<f64> {
        let name = format!("{section_name}.{key}");
        match f.f64_opt(s, key, &name)? {
            None => Err(f.err(&name, format!("missing for rope_type {kind:?}"))),
            Some(x) if x <= 0.0 => Err(f.err(&name, format!("must be positive, got {x}"))),
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
