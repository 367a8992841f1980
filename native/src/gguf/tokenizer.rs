//! A `tokenizers::Tokenizer` from `tokenizer.ggml.*` metadata, built the way Hugging Face
//! transformers builds one from the same GGUF (`transformers.integrations.gguf`), so that a
//! prompt gets the ids the model was evaluated with there.
//!
//! - `tokenizer.ggml.model = "llama"`: SentencePiece-style BPE with byte fallback, merges
//!   recovered from the vocabulary (`tokenizer_spm`).
//! - `tokenizer.ggml.model = "gpt2"`: byte-level BPE with the file's merges, the text split by
//!   the regex `tokenizer.ggml.pre` names (this module).
//!
//! Tokens typed control become special added tokens, user-defined ones plain added tokens, so
//! that text like `<start_of_turn>` stays one token.

use std::collections::HashSet;
use std::path::Path;

use serde_json::{json, Value};
use tokenizers::{AddedToken, Model, PostProcessorWrapper, Tokenizer};

use super::Metadata;
use crate::error::{EngineError, Result};

use super::tokenizer_bpe::{build_gpt2, in_byte_alphabet};
use super::tokenizer_spm::build_spm;

/// `tokenizer.ggml.token_type` values (llama.cpp's `llama_token_type`).
pub(crate) const TYPE_CONTROL: i64 = 3;
pub(crate) const TYPE_USER_DEFINED: i64 = 4;

/// The tokenizer of a GGUF file, and what a runner needs beside it.
pub struct GgufTokenizer {
    /// `encode(text, true)` adds BOS (and EOS) exactly when the file says so.
    pub tokenizer: Tokenizer,
    pub bos_token_id: Option<u32>,
    /// `tokenizer.ggml.eos_token_id`, then `eot_token_id` and `eom_token_id` when present,
    /// then control tokens spelled as a well-known end of turn (`END_OF_TURN_TEXTS`).
    pub eos_token_ids: Vec<u32>,
    /// `tokenizer.chat_template`.
    pub chat_template: Option<String>,
    /// Special-token texts for chat templates: bos_token, eos_token, unk_token, pad_token (when present).
    pub special_tokens: Vec<(String, String)>,
}

/// The vocabulary and the keys both kinds share, checked.
pub(crate) struct Vocab<'a> {
    pub path: &'a Path,
    pub tokens: Vec<&'a str>,
    /// One per token; all 1 (normal) when the file has no `token_type`.
    pub types: Vec<i64>,
    pub bos: Option<u32>,
    pub eos: Option<u32>,
    pub unk: Option<u32>,
    pub pad: Option<u32>,
    pub add_bos: bool,
    pub add_eos: bool,
}

pub(crate) fn field_err(path: &Path, key: &str, message: impl Into<String>) -> EngineError {
    EngineError::field(path, key, message)
}

/// A JSON description of a tokenizer component, in `tokenizer.json`'s own format.
pub(crate) fn component<T: serde::de::DeserializeOwned>(path: &Path, what: &str, v: Value) -> Result<T> {
    serde_json::from_value(v).map_err(|e| EngineError::Tokenizer { path: path.to_path_buf(), message: format!("{what}: {e}") })
}

pub fn from_metadata(meta: &Metadata) -> Result<GgufTokenizer> {
    let path = meta.path.as_path();
    let kind = meta.str_opt("tokenizer.ggml.model")?.ok_or_else(|| field_err(path, "tokenizer.ggml.model", "missing"))?;
    if kind != "llama" && kind != "gpt2" {
        return Err(field_err(path, "tokenizer.ggml.model", format!("unsupported tokenizer model {kind:?} (supported: \"llama\", \"gpt2\")")));
    }
    let vocab = read_vocab(meta, kind)?;
    let mut tokenizer = match kind {
        "llama" => build_spm(meta, &vocab)?,
        _ => build_gpt2(meta, &vocab)?,
    };
    add_special_tokens(&mut tokenizer, &vocab, kind == "gpt2");
    tokenizer.with_post_processor(Some(post_processor(&vocab)?));

    let mut eos_token_ids = Vec::new();
    for key in ["tokenizer.ggml.eos_token_id", "tokenizer.ggml.eot_token_id", "tokenizer.ggml.eom_token_id"] {
        if let Some(id) = token_id(meta, key, vocab.tokens.len())? {
            if !eos_token_ids.contains(&id) {
                eos_token_ids.push(id);
            }
        }
    }
    // Files rarely name the end-of-turn token of their chat format in the metadata, so
    // generation also stops at the well-known ones, as llama.cpp does.
    for (id, (&tok, &ty)) in vocab.tokens.iter().zip(&vocab.types).enumerate() {
        if (ty == TYPE_CONTROL || ty == TYPE_USER_DEFINED) && END_OF_TURN_TEXTS.contains(&tok) && !eos_token_ids.contains(&(id as u32)) {
            eos_token_ids.push(id as u32);
        }
    }
    let special_tokens = [("bos_token", vocab.bos), ("eos_token", vocab.eos), ("unk_token", vocab.unk), ("pad_token", vocab.pad)]
        .into_iter()
        .filter_map(|(name, id)| id.map(|id| (name.to_string(), vocab.tokens[id as usize].to_string())))
        .collect();
    Ok(GgufTokenizer {
        tokenizer,
        bos_token_id: vocab.bos,
        eos_token_ids,
        chat_template: meta.str_opt("tokenizer.chat_template")?.map(str::to_string),
        special_tokens,
    })
}

/// End-of-turn tokens of well-known chat formats (Gemma, Llama 3, ChatML, Phi-3, GPT-2-style,
/// Granite, DeepSeek), by their exact text.
const END_OF_TURN_TEXTS: [&str; 9] = ["<end_of_turn>", "<|eot_id|>", "<|eom_id|>", "<|im_end|>", "<|end|>", "<|endoftext|>", "<|end_of_text|>", "<EOT>", "<｜end▁of▁sentence｜>"];

/// An optional token id, checked against the vocabulary size.
fn token_id(meta: &Metadata, key: &str, n: usize) -> Result<Option<u32>> {
    match meta.u64_opt(key)? {
        None => Ok(None),
        Some(id) if id < n as u64 => Ok(Some(id as u32)),
        Some(id) => Err(field_err(&meta.path, key, format!("token id {id} is out of range for a vocabulary of {n} tokens"))),
    }
}

fn read_vocab<'a>(meta: &'a Metadata, kind: &str) -> Result<Vocab<'a>> {
    let path = meta.path.as_path();
    let tokens = meta.str_array_opt("tokenizer.ggml.tokens")?.ok_or_else(|| field_err(path, "tokenizer.ggml.tokens", "missing"))?;
    let n = tokens.len();
    if n == 0 {
        return Err(field_err(path, "tokenizer.ggml.tokens", "is empty"));
    }
    if n > u32::MAX as usize {
        return Err(field_err(path, "tokenizer.ggml.tokens", format!("{n} tokens is too many")));
    }
    let types = match meta.array_opt("tokenizer.ggml.token_type", "integers", |v| v.as_i64())? {
        None => vec![1; n],
        Some(t) if t.len() != n => {
            return Err(field_err(path, "tokenizer.ggml.token_type", format!("has {} entries for {n} tokens", t.len())));
        }
        Some(t) => {
            if let Some(i) = t.iter().position(|&v| !(0..=6).contains(&v)) {
                return Err(field_err(path, &format!("tokenizer.ggml.token_type[{i}]"), format!("unknown token type {}", t[i])));
            }
            t
        }
    };
    // llama.cpp adds BOS to a SentencePiece vocabulary that does not say otherwise; transformers follows.
    let add_bos = meta.bool_opt("tokenizer.ggml.add_bos_token")?.unwrap_or(kind == "llama");
    let add_eos = meta.bool_opt("tokenizer.ggml.add_eos_token")?.unwrap_or(false);
    let bos = token_id(meta, "tokenizer.ggml.bos_token_id", n)?;
    let eos = token_id(meta, "tokenizer.ggml.eos_token_id", n)?;
    if add_bos && bos.is_none() && meta.get("tokenizer.ggml.add_bos_token").is_some() {
        return Err(field_err(path, "tokenizer.ggml.bos_token_id", "missing, while tokenizer.ggml.add_bos_token is true"));
    }
    if add_eos && eos.is_none() {
        return Err(field_err(path, "tokenizer.ggml.eos_token_id", "missing, while tokenizer.ggml.add_eos_token is true"));
    }
    Ok(Vocab {
        path,
        tokens,
        types,
        bos,
        eos,
        unk: token_id(meta, "tokenizer.ggml.unknown_token_id", n)?,
        pad: token_id(meta, "tokenizer.ggml.padding_token_id", n)?,
        add_bos,
        add_eos,
    })
}

/// Control tokens as special added tokens, user-defined ones as plain added tokens, then the
/// named special tokens (bos, eos, unk, pad) as special, as transformers adds them. All match
/// the raw text (not normalized). A token is only added under an id the model already has.
fn add_special_tokens(tokenizer: &mut Tokenizer, vocab: &Vocab, byte_level: bool) {
    let in_model = |t: &Tokenizer, s: &str| t.get_model().token_to_id(s).is_some();
    let mut added: Vec<AddedToken> = Vec::new();
    let mut seen = HashSet::new();
    for (&tok, &ty) in vocab.tokens.iter().zip(&vocab.types) {
        // In a byte-level vocabulary a control token spelled outside the byte alphabet is a
        // mislabel by the converter; transformers skips it.
        if ty == TYPE_CONTROL && (!byte_level || in_byte_alphabet(tok)) && seen.insert(tok) {
            added.push(AddedToken::from(tok, true).normalized(false));
        }
    }
    tokenizer.add_special_tokens(&added);
    let user: Vec<AddedToken> = vocab
        .tokens
        .iter()
        .zip(&vocab.types)
        .filter(|&(&tok, &ty)| ty == TYPE_USER_DEFINED && in_model(tokenizer, tok) && seen.insert(tok))
        .map(|(&tok, _)| AddedToken::from(tok, false).normalized(false))
        .collect();
    tokenizer.add_tokens(&user);
    let named: Vec<AddedToken> = [vocab.bos, vocab.eos, vocab.unk, vocab.pad]
        .into_iter()
        .flatten()
        .map(|id| vocab.tokens[id as usize])
        .filter(|&tok| in_model(tokenizer, tok) && seen.insert(tok))
        .map(|tok| AddedToken::from(tok, true).normalized(false))
        .collect();
    tokenizer.add_special_tokens(&named);
}

/// `<bos> $A <eos>` as the file's add_bos/add_eos say (transformers' `update_post_processor`).
fn post_processor(vocab: &Vocab) -> Result<PostProcessorWrapper> {
    let mut special = serde_json::Map::new();
    let mut piece = |id: Option<u32>, on: bool, type_id: u32| -> Option<Value> {
        let id = id.filter(|_| on)?;
        let tok = vocab.tokens[id as usize];
        special.insert(tok.to_string(), json!({"id": tok, "ids": [id], "tokens": [tok]}));
        Some(json!({"SpecialToken": {"id": tok, "type_id": type_id}}))
    };
    let seq = |name: &str, type_id: u32| json!({"Sequence": {"id": name, "type_id": type_id}});
    let single: Vec<Value> = [piece(vocab.bos, vocab.add_bos, 0), Some(seq("A", 0)), piece(vocab.eos, vocab.add_eos, 0)].into_iter().flatten().collect();
    let mut pair = single.clone();
    pair.extend([piece(vocab.bos, vocab.add_bos, 1), Some(seq("B", 1)), piece(vocab.eos, vocab.add_eos, 1)].into_iter().flatten());
    component(vocab.path, "post-processor", json!({"type": "TemplateProcessing", "single": single, "pair": pair, "special_tokens": special}))
}
