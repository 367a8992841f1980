//! A GGUF file as a model: its metadata read as a `ModelConfig` and its tensors renamed to the
//! Hugging Face names the decoder loads, so GGUF models run on the same decoder as
//! safetensors folders.
//!
//! The metadata is rewritten into the `config.json` a Hugging Face folder of the same model
//! would carry and parsed by the same code (one set of checks); errors are then renamed back
//! to the GGUF key at fault.

use std::sync::Arc;

use serde_json::{json, Map, Value};

use super::checkpoint::Checkpoint;
use super::config::{Architecture, ModelConfig, RopeScaling};
use crate::error::{EngineError, Result};
use crate::gguf::reader::{GgufFile, TensorInfo};
use crate::gguf::Metadata;
use crate::tensor::WeightFormat;

/// GGUF architectures this engine runs (`general.architecture`).
const ARCHITECTURES: [(&str, Architecture); 3] = [("llama", Architecture::Llama), ("qwen2", Architecture::Qwen2), ("gemma3", Architecture::Gemma3)];

/// The model's configuration from the file's metadata and tensor directory.
pub fn config(file: &GgufFile) -> Result<ModelConfig> {
    let meta = &file.metadata;
    let arch_name = meta.str_opt("general.architecture")?.ok_or_else(|| EngineError::field(&file.path, "general.architecture", "missing"))?;
    let Some(&(a, architecture)) = ARCHITECTURES.iter().find(|(name, _)| *name == arch_name) else {
        let names: Vec<&str> = ARCHITECTURES.iter().map(|(n, _)| *n).collect();
        return Err(EngineError::field(&file.path, "general.architecture", format!("{arch_name:?} is not supported ({})", names.join(", "))));
    };
    // (config.json key, GGUF key) of every value carried over
    let mut keys: Vec<(&str, String)> = vec![
        ("hidden_size", format!("{a}.embedding_length")),
        ("intermediate_size", format!("{a}.feed_forward_length")),
        ("num_hidden_layers", format!("{a}.block_count")),
        ("num_attention_heads", format!("{a}.attention.head_count")),
        ("num_key_value_heads", format!("{a}.attention.head_count_kv")),
        ("head_dim", format!("{a}.attention.key_length")),
        ("max_position_embeddings", format!("{a}.context_length")),
        ("rms_norm_eps", format!("{a}.attention.layer_norm_rms_epsilon")),
        ("rope_theta", format!("{a}.rope.freq_base")),
        ("sliding_window", format!("{a}.attention.sliding_window")),
        ("bos_token_id", "tokenizer.ggml.bos_token_id".into()),
        ("eos_token_id", "tokenizer.ggml.eos_token_id".into()),
    ];
    let mut obj = Map::new();
    obj.insert("architectures".into(), json!([architecture.hf_name()]));
    for (hf, key) in &keys {
        if let Some(v) = meta.get(key) {
            obj.insert((*hf).into(), to_json(meta, key, v)?);
        }
    }
    if let (Some(k), Some(v)) = (meta.u64_opt(&format!("{a}.attention.key_length"))?, meta.u64_opt(&format!("{a}.attention.value_length"))?) {
        if k != v {
            return Err(EngineError::field(&file.path, format!("{a}.attention.value_length"), format!("{v} differs from key_length {k}; not supported")));
        }
    }
    let vocab = match meta.get(&format!("{a}.vocab_size")) {
        Some(v) => to_json(meta, &format!("{a}.vocab_size"), v)?,
        None => match meta.get("tokenizer.ggml.tokens") {
            Some(crate::gguf::MetaValue::Array(tokens)) => json!(tokens.len()),
            _ => json!(file.tensor("token_embd.weight").and_then(|t| t.dims.get(1).copied()).unwrap_or(0)),
        },
    };
    obj.insert("vocab_size".into(), vocab);
    keys.push(("vocab_size", format!("{a}.vocab_size")));
    obj.insert("tie_word_embeddings".into(), json!(file.tensor("output.weight").is_none()));
    obj.insert("attention_bias".into(), json!(file.tensor("blk.0.attn_q.bias").is_some()));
    if architecture == Architecture::Gemma3 {
        // llama.cpp's fixed Gemma 3 layout: every 6th layer global, local layers rotate with
        // base 10000, queries scaled by 1/sqrt(head_dim) (27B, 62 layers: by hidden/heads).
        obj.insert("sliding_window_pattern".into(), json!(6));
        obj.insert("rope_local_base_freq".into(), json!(10000.0));
        if meta.u64_opt(&format!("{a}.block_count"))? == Some(62) {
            let (h, heads) = (meta.usize_req(&format!("{a}.embedding_length"))?, meta.usize_req(&format!("{a}.attention.head_count"))?);
            obj.insert("query_pre_attn_scalar".into(), json!(h / heads.max(1)));
        }
    }
    if let Some(kind) = meta.str_opt(&format!("{a}.rope.scaling.type"))? {
        match kind {
            "none" => {}
            "linear" => {
                let factor = meta.f64_opt(&format!("{a}.rope.scaling.factor"))?;
                obj.insert("rope_scaling".into(), json!({"rope_type": "linear", "factor": factor}));
                keys.push(("rope_scaling.factor", format!("{a}.rope.scaling.factor")));
            }
            other => {
                return Err(EngineError::field(&file.path, format!("{a}.rope.scaling.type"), format!("{other:?} is not supported (none, linear)")))
            }
        }
    }
    let mut cfg = ModelConfig::from_object(&file.path, &obj).map_err(|e| rename_field(e, &keys))?;
    if architecture == Architecture::Gemma3 {
        cfg.blocks.norm_offset = 0.0; // llama.cpp's converter stores Gemma's norms as 1 + w
    }
    if let Some(t) = file.tensor("rope_freqs.weight") {
        cfg.rope_scaling = RopeScaling::Factors(rope_factors(file, t, cfg.head_dim)?);
    }
    cfg.stored_dtype = Some("gguf".into());
    Ok(cfg)
}

fn to_json(meta: &Metadata, key: &str, v: &crate::gguf::MetaValue) -> Result<Value> {
    use crate::gguf::MetaValue as M;
    Ok(match v {
        M::F32(x) => json!(*x as f64),
        M::F64(x) => json!(*x),
        M::Bool(b) => json!(*b),
        M::Str(s) => json!(s),
        _ => match (v.as_u64(), v.as_i64()) {
            (Some(u), _) => json!(u),
            (None, Some(i)) => json!(i),
            _ => return Err(EngineError::field(&meta.path, key, format!("expected a number, found {}", v.type_name()))),
        },
    })
}

/// An error about a config.json field, renamed to the GGUF key it came from.
fn rename_field(e: EngineError, keys: &[(&str, String)]) -> EngineError {
    match e {
        EngineError::ConfigField { path, field, message } => {
            let field = keys.iter().find(|(hf, _)| *hf == field).map_or(field, |(_, key)| key.clone());
            EngineError::ConfigField { path, field, message }
        }
        other => other,
    }
}

/// GGUF's `rope_freqs` (Llama 3 rope scaling as one divisor per rotary pair), f32.
fn rope_factors(file: &GgufFile, t: &TensorInfo, head_dim: usize) -> Result<Vec<f64>> {
    if t.format != WeightFormat::F32 || t.dims != [head_dim / 2] {
        return Err(EngineError::tensor(&file.path, &t.name, format!("expected F32 [{}], found {:?} {:?}", head_dim / 2, t.format, t.dims)));
    }
    let factors: Vec<f64> = file.bytes(t).chunks_exact(4).map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]) as f64).collect();
    if factors.iter().any(|f| !(f.is_finite() && *f > 0.0)) {
        return Err(EngineError::tensor(&file.path, &t.name, "factors must be positive and finite"));
    }
    Ok(factors)
}

/// The file's tensors under their Hugging Face names, as (rows, cols) matrices and vectors;
/// Llama's q and k rows un-interleaved into owned copies, everything else a view of the file.
pub fn checkpoint(file: &GgufFile, architecture: Architecture, cfg: &ModelConfig) -> Result<Checkpoint> {
    let mut ckpt = Checkpoint::empty();
    let mapped = ckpt.add_bytes(file.path.clone(), file.map.clone());
    for t in &file.tensors {
        let Some(name) = hf_name(&t.name, architecture) else { continue };
        // ggml lists the row length first
        let shape: Vec<usize> = t.dims.iter().rev().copied().collect();
        if needs_unpermute(&name, architecture) {
            let rows = if shape.len() == 2 { shape[0] } else { t.dims[0] };
            let row_bytes = (t.end - t.start) / rows.max(1);
            if rows % cfg.head_dim != 0 || row_bytes * rows != t.end - t.start {
                return Err(EngineError::tensor(&file.path, &t.name, format!("{rows} rows are not whole heads of {}", cfg.head_dim)));
            }
            let src = file.bytes(t);
            let mut out = vec![0u8; src.len()];
            for r in 0..rows {
                let hf = unpermuted_row(r, cfg.head_dim);
                out[hf * row_bytes..(hf + 1) * row_bytes].copy_from_slice(&src[r * row_bytes..(r + 1) * row_bytes]);
            }
            let len = out.len();
            let owned = ckpt.add_bytes(file.path.clone(), Arc::new(out));
            ckpt.insert(name, owned, t.format, shape, 0, len)?;
        } else {
            ckpt.insert(name, mapped, t.format, shape, t.start, t.end)?;
        }
    }
    Ok(ckpt)
}

/// The Hugging Face name of a GGUF tensor (None for tensors the decoder does not load).
pub fn hf_name(gguf: &str, architecture: Architecture) -> Option<String> {
    let top = match gguf {
        "token_embd.weight" => Some("model.embed_tokens.weight"),
        "output_norm.weight" => Some("model.norm.weight"),
        "output.weight" => Some("lm_head.weight"),
        _ => None,
    };
    if let Some(name) = top {
        return Some(name.into());
    }
    let rest = gguf.strip_prefix("blk.")?;
    let (layer, rest) = rest.split_once('.')?;
    let layer: usize = layer.parse().ok()?;
    let (base, suffix) = rest.rsplit_once('.')?;
    let sandwich = architecture == Architecture::Gemma3;
    let hf = match base {
        "attn_norm" => "input_layernorm",
        "attn_q" => "self_attn.q_proj",
        "attn_k" => "self_attn.k_proj",
        "attn_v" => "self_attn.v_proj",
        "attn_output" => "self_attn.o_proj",
        "attn_q_norm" => "self_attn.q_norm",
        "attn_k_norm" => "self_attn.k_norm",
        "ffn_norm" if sandwich => "pre_feedforward_layernorm",
        "ffn_norm" => "post_attention_layernorm",
        "post_attention_norm" => "post_attention_layernorm",
        "post_ffw_norm" => "post_feedforward_layernorm",
        "ffn_gate" => "mlp.gate_proj",
        "ffn_up" => "mlp.up_proj",
        "ffn_down" => "mlp.down_proj",
        _ => return None,
    };
    Some(format!("model.layers.{layer}.{hf}.{suffix}"))
}

/// llama.cpp stores Llama's q and k projections with the rows of each head interleaved for
/// its rotary layout (pairs (i, i + d/2) become rows 2i, 2i + 1): the row of the Hugging Face
/// layout that GGUF row `r` holds, for heads of `head_dim`.
pub fn unpermuted_row(r: usize, head_dim: usize) -> usize {
    let (head, within) = (r / head_dim, r % head_dim);
    head * head_dim + (within % 2) * (head_dim / 2) + within / 2
}

/// Whether tensor `hf` must have its rows un-interleaved (Llama's q and k in GGUF).
pub fn needs_unpermute(hf: &str, architecture: Architecture) -> bool {
    architecture == Architecture::Llama && (hf.ends_with("self_attn.q_proj.weight") || hf.ends_with("self_attn.k_proj.weight") || hf.ends_with("self_attn.q_proj.bias") || hf.ends_with("self_attn.k_proj.bias"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unpermute_inverts_llama_cpp_permutation() {
        // llama.cpp: w.reshape(heads, 2, hd/2, ...).swapaxes(1, 2): GGUF row h*hd + 2i + s holds
        // HF row h*hd + s*hd/2 + i.
        let (heads, hd) = (3, 8);
        for h in 0..heads {
            for i in 0..hd / 2 {
                for s in 0..2 {
                    assert_eq!(unpermuted_row(h * hd + 2 * i + s, hd), h * hd + s * hd / 2 + i);
                }
            }
        }
    }

    #[test]
    fn names_map_per_architecture() {
        assert_eq!(hf_name("blk.3.ffn_norm.weight", Architecture::Llama).as_deref(), Some("model.layers.3.post_attention_layernorm.weight"));
        assert_eq!(hf_name("blk.3.ffn_norm.weight", Architecture::Gemma3).as_deref(), Some("model.layers.3.pre_feedforward_layernorm.weight"));
        assert_eq!(hf_name("blk.0.attn_q.bias", Architecture::Qwen2).as_deref(), Some("model.layers.0.self_attn.q_proj.bias"));
        assert_eq!(hf_name("token_embd.weight", Architecture::Llama).as_deref(), Some("model.embed_tokens.weight"));
        assert_eq!(hf_name("rope_freqs.weight", Architecture::Llama), None);
        assert_eq!(hf_name("blk.x.attn_q.weight", Architecture::Llama), None);
    }
}
