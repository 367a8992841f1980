//! Where a model comes from: a Hugging Face folder (config.json, safetensors, tokenizer.json)
//! or one GGUF file (metadata, tensors and tokenizer in one). Either way the engine gets the
//! same parts: a config, a checkpoint of tensors under Hugging Face names, a tokenizer and
//! the EOS ids.

use std::path::{Path, PathBuf};

use tokenizers::Tokenizer;

use crate::error::{EngineError, Result};
use crate::gguf::reader::GgufFile;
use crate::gguf::tokenizer::from_metadata;
use crate::model::checkpoint::Checkpoint;
use crate::model::config::{read_json_object, token_ids, ModelConfig};
use crate::model::gguf_model;
use crate::model::scheme::WeightScheme;
use crate::model::tokenizer_file::tokenizer_from_bytes;

pub struct ModelSource {
    pub cfg: ModelConfig,
    pub checkpoint: Checkpoint,
    pub tokenizer: Tokenizer,
    pub eos_token_ids: Vec<u32>,
    /// A GGUF file's chat template and special-token texts.
    pub chat: Option<(Option<String>, Vec<(String, String)>)>,
    pub scheme: WeightScheme,
}

/// A file that starts with the GGUF magic (whatever its name).
pub fn is_gguf(path: &Path) -> bool {
    use std::io::Read;
    let mut magic = [0u8; 4];
    path.is_file() && std::fs::File::open(path).and_then(|mut f| f.read_exact(&mut magic)).is_ok() && &magic == b"GGUF"
}

impl ModelSource {
    /// `weights`: the `weights=` option; empty for the default (f32 for folders, the stored
    /// formats for GGUF files).
    pub fn open(path: &Path, weights: &str) -> Result<Self> {
        let gguf = is_gguf(path);
        let weights = match weights {
            "" if gguf => "stored",
            "" => "f32",
            w => w,
        };
        let scheme = WeightScheme::parse(weights).ok_or_else(|| {
            EngineError::InvalidArgument(format!(
                "weights {weights:?} is unknown (expected one of stored, f32, f16, bf16, q8_0, q4_0, q5_0, q4_k, q6_k, q4_k_m)"
            ))
        })?;
        if gguf {
            return Self::gguf(path, scheme);
        }
        if path.is_file() {
            return Err(EngineError::file(path, "not a model folder and not a GGUF file (no GGUF magic)"));
        }
        if !path.is_dir() {
            return Err(EngineError::file(path, "model folder not found"));
        }
        let cfg = ModelConfig::load(path)?;
        let checkpoint = Checkpoint::open(path)?;
        let tokenizer = load_tokenizer(&path.join("tokenizer.json"))?;
        let eos_token_ids = load_eos(path, &cfg)?;
        check_plausible(path, &cfg, &checkpoint, &eos_token_ids, "num_hidden_layers", "eos_token_id")?;
        Ok(ModelSource { cfg, checkpoint, tokenizer, eos_token_ids, chat: None, scheme })
    }

    fn gguf(path: &Path, scheme: WeightScheme) -> Result<Self> {
        let file = GgufFile::open(path)?;
        let mut cfg = gguf_model::config(&file)?;
        let tok = from_metadata(&file.metadata)?;
        cfg.bos_token_id = tok.bos_token_id.or(cfg.bos_token_id);
        if cfg.vocab_size < tok.tokenizer.get_vocab_size(true) {
            return Err(EngineError::field(path, "tokenizer.ggml.tokens", format!("{} tokens for an embedding of {} rows", tok.tokenizer.get_vocab_size(true), cfg.vocab_size)));
        }
        let checkpoint = gguf_model::checkpoint(&file, cfg.architecture, &cfg)?;
        let eos_token_ids = if tok.eos_token_ids.is_empty() { cfg.eos_token_ids.clone() } else { tok.eos_token_ids.clone() };
        let a = file.metadata.str_opt("general.architecture")?.unwrap_or("llama").to_string();
        check_plausible(path, &cfg, &checkpoint, &eos_token_ids, &format!("{a}.block_count"), "tokenizer.ggml.eos_token_id")?;
        Ok(ModelSource { cfg, checkpoint, tokenizer: tok.tokenizer, eos_token_ids, chat: Some((tok.chat_template, tok.special_tokens)), scheme })
    }
}

/// Values a file can hold but no model has: stored layers beyond the layer count (the config
/// would silently run a truncated model) and EOS ids outside the vocabulary (generation could
/// never stop on them). `layers_key` and `eos_key` name the fields as the file spells them.
fn check_plausible(path: &Path, cfg: &ModelConfig, ckpt: &Checkpoint, eos: &[u32], layers_key: &str, eos_key: &str) -> Result<()> {
    if let Some(last) = ckpt.last_layer().filter(|&l| l >= cfg.num_hidden_layers) {
        return Err(EngineError::field(path, layers_key, format!("{} layers, but the weights hold layer {last} too (model.layers.{last}.*)", cfg.num_hidden_layers)));
    }
    if let Some(&bad) = eos.iter().find(|&&t| t as usize >= cfg.vocab_size) {
        return Err(EngineError::field(path, eos_key, format!("{bad} is outside the vocabulary of {} tokens", cfg.vocab_size)));
    }
    Ok(())
}

fn load_tokenizer(path: &PathBuf) -> Result<Tokenizer> {
    if !path.is_file() {
        return Err(EngineError::Tokenizer { path: path.clone(), message: "missing".into() });
    }
    let bytes = std::fs::read(path).map_err(|e| EngineError::Tokenizer { path: path.clone(), message: format!("cannot read: {e}") })?;
    tokenizer_from_bytes(path, &bytes)
}

/// EOS ids from generation_config.json (a single id or a list), else from config.json.
fn load_eos(model_dir: &Path, cfg: &ModelConfig) -> Result<Vec<u32>> {
    let path = model_dir.join("generation_config.json");
    if path.is_file() {
        let obj = read_json_object(&path)?;
        let ids = token_ids(&path, "eos_token_id", obj.get("eos_token_id"))?;
        if !ids.is_empty() {
            return Ok(ids);
        }
    }
    Ok(cfg.eos_token_ids.clone())
}
