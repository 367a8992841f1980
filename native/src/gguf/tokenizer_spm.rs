//! SentencePiece-style vocabularies (`tokenizer.ggml.model = "llama"`; Llama 2, Mistral, Gemma):
//! a BPE with byte fallback whose merges are recovered from the vocabulary, as transformers'
//! GGUF loader does (`get_merges` / `generate_merges`, `gemma_tokenizer`, `phi3_tokenizer`).

use std::cmp::Ordering;
use std::collections::HashMap;

use serde_json::{json, Value};
use tokenizers::models::bpe::{Vocab as BpeVocab, BPE};
use tokenizers::{DecoderWrapper, NormalizerWrapper, PreTokenizerWrapper, Tokenizer};

use super::tokenizer::{component, field_err, Vocab};
use super::Metadata;
use crate::error::Result;

/// How the text around the pieces is handled, by `general.architecture`.
#[derive(Clone, Copy, PartialEq, Debug)]
enum Flavor {
    /// `LlamaTokenizer`: `Metaspace` pre-tokenizer (prefix "▁" on the first piece only).
    Llama,
    /// `GemmaTokenizer`: spaces replaced by a normalizer, merges ordered by vocabulary position.
    Gemma,
    /// Phi-3: the prefix "▁" comes from a normalizer, no pre-tokenizer.
    Phi3,
}

/// Python's `str.isspace` (Rust's `char::is_whitespace` lacks the four separators U+001C..U+001F).
fn py_isspace(c: char) -> bool {
    c.is_whitespace() || ('\u{1c}'..='\u{1f}').contains(&c)
}

pub(crate) fn build_spm(meta: &Metadata, vocab: &Vocab) -> Result<Tokenizer> {
    let path = vocab.path;
    let n = vocab.tokens.len();
    let flavor = match meta.str_opt("general.architecture")? {
        Some("gemma" | "gemma2" | "gemma3" | "gemma3n") => Flavor::Gemma,
        Some("phi3") => Flavor::Phi3,
        _ => Flavor::Llama,
    };
    let add_prefix = meta.bool_opt("tokenizer.ggml.add_space_prefix")?.unwrap_or(true);
    let scores = meta.array_opt("tokenizer.ggml.scores", "numbers", |v| v.as_f64())?;
    if let Some(s) = &scores {
        if s.len() != n {
            return Err(field_err(path, "tokenizer.ggml.scores", format!("has {} entries for {n} tokens", s.len())));
        }
    }

    // Gemma files store a token of spaces as real spaces, while the model looks pieces up with "▁".
    let tokens: Vec<std::borrow::Cow<str>> = vocab
        .tokens
        .iter()
        .map(|&t| if flavor == Flavor::Gemma && t.contains(' ') && t.chars().all(py_isspace) { "\u{2581}".repeat(t.chars().count()).into() } else { t.into() })
        .collect();
    // A Python dict from the token list: a repeated token keeps its last id.
    let mut ids: HashMap<&str, u32> = HashMap::with_capacity(n);
    for (i, t) in tokens.iter().enumerate() {
        ids.insert(t, i as u32);
    }

    let merges: Vec<(String, String)> = match meta.str_array_opt("tokenizer.ggml.merges")? {
        Some(list) => file_merges(path, &list, &ids)?,
        None => {
            // Gemma's scores do not follow its merge order; its vocabulary order does.
            let rank: Vec<f64> = match (flavor, &scores) {
                (Flavor::Gemma, _) => (0..n).map(|i| -(i as f64)).collect(),
                (_, Some(s)) => s.clone(),
                (_, None) => return Err(field_err(path, "tokenizer.ggml.scores", "missing (needed to recover the merges)")),
            };
            generate_merges(&tokens, &ids, &rank)
        }
    };

    let owned_ids: BpeVocab = ids.iter().map(|(&t, &i)| (t.to_string(), i)).collect();
    let mut builder = BPE::builder().vocab_and_merges(owned_ids, merges).byte_fallback(true).fuse_unk(true);
    if flavor == Flavor::Gemma && ids.contains_key("<unk>") {
        builder = builder.unk_token("<unk>".to_string());
    }
    let bpe = builder.build().map_err(|e| field_err(path, "tokenizer.ggml.tokens", format!("building the BPE model: {e}")))?;
    let mut tokenizer = Tokenizer::new(bpe);

    let replace = json!({"type": "Replace", "pattern": {"String": " "}, "content": "\u{2581}"});
    let (normalizer, pre_tokenizer, strip): (Option<Value>, Option<Value>, bool) = match flavor {
        Flavor::Gemma => (
            Some(if add_prefix { prepend_then(replace) } else { replace }),
            Some(json!({"type": "Split", "pattern": {"String": " "}, "behavior": "MergedWithPrevious", "invert": false})),
            add_prefix,
        ),
        Flavor::Phi3 => (Some(if add_prefix { prepend_then(replace) } else { replace }), None, add_prefix),
        Flavor::Llama => (
            None,
            Some(json!({"type": "Metaspace", "replacement": "\u{2581}", "prepend_scheme": if add_prefix { "first" } else { "never" }, "split": false})),
            add_prefix,
        ),
    };
    let normalizer: Option<NormalizerWrapper> = normalizer.map(|v| component(path, "normalizer", v)).transpose()?;
    let pre_tokenizer: Option<PreTokenizerWrapper> = pre_tokenizer.map(|v| component(path, "pre-tokenizer", v)).transpose()?;
    let mut decoders =
        vec![json!({"type": "Replace", "pattern": {"String": "\u{2581}"}, "content": " "}), json!({"type": "ByteFallback"}), json!({"type": "Fuse"})];
    if strip {
        decoders.push(json!({"type": "Strip", "content": " ", "start": 1, "stop": 0}));
    }
    let decoder: DecoderWrapper = component(path, "decoder", json!({"type": "Sequence", "decoders": decoders}))?;
    tokenizer.with_normalizer(normalizer);
    tokenizer.with_pre_tokenizer(pre_tokenizer);
    tokenizer.with_decoder(Some(decoder));
    Ok(tokenizer)
}

fn prepend_then(replace: Value) -> Value {
    json!({"type": "Sequence", "normalizers": [{"type": "Prepend", "prepend": "\u{2581}"}, replace]})
}

fn file_merges(path: &std::path::Path, list: &[&str], ids: &HashMap<&str, u32>) -> Result<Vec<(String, String)>> {
    list.iter()
        .enumerate()
        .map(|(i, m)| {
            let mut parts = m.split(' ');
            match (parts.next(), parts.next(), parts.next()) {
                (Some(a), Some(b), None) if ids.contains_key(a) && ids.contains_key(b) && ids.contains_key(format!("{a}{b}").as_str()) => {
                    Ok((a.to_string(), b.to_string()))
                }
                _ => Err(field_err(
                    path,
                    &format!("tokenizer.ggml.merges[{i}]"),
                    format!("{m:?} is not two tokens of the vocabulary, one space apart, that join into a third"),
                )),
            }
        })
        .collect()
}

/// transformers' `generate_merges(vocab, vocab_scores)`: for each distinct token (first-seen
/// order), every split into two in-vocabulary pieces, ordered by the pieces' ids; then all of
/// them stably sorted best first by (the merged token's rank, left length, right length).
/// Linear in the total length of the vocabulary, plus one sort.
fn generate_merges(tokens: &[std::borrow::Cow<str>], ids: &HashMap<&str, u32>, rank: &[f64]) -> Vec<(String, String)> {
    struct Merge {
        left: u32,
        right: u32,
        rank: f64,
        left_len: usize,
        right_len: usize,
    }
    // The dict's value for a repeated token is its last occurrence's rank.
    let mut done = vec![false; tokens.len()];
    let mut merges: Vec<Merge> = Vec::new();
    let mut local: Vec<Merge> = Vec::new();
    for token in tokens {
        let last = ids[token.as_ref()] as usize;
        if std::mem::replace(&mut done[last], true) {
            continue;
        }
        let total = token.chars().count();
        for (n, (at, _)) in token.char_indices().enumerate().skip(1) {
            let (l, r) = token.split_at(at);
            if let (Some(&left), Some(&right)) = (ids.get(l), ids.get(r)) {
                local.push(Merge { left, right, rank: rank[last], left_len: n, right_len: total - n });
            }
        }
        local.sort_by_key(|m| (m.left, m.right));
        merges.append(&mut local);
    }
    // Python's `sorted(..., reverse=True)` keeps equal keys in their original order.
    merges.sort_by(|a, b| b.rank.total_cmp(&a.rank).then(b.left_len.cmp(&a.left_len)).then(b.right_len.cmp(&a.right_len)).then(Ordering::Equal));
    merges.into_iter().map(|m| (tokens[m.left as usize].to_string(), tokens[m.right as usize].to_string())).collect()
}
