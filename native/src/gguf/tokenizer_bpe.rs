//! Byte-level BPE (`tokenizer.ggml.model = "gpt2"`; Llama 3, Qwen2, ...): transformers'
//! `GPT2Tokenizer` with the file's merges, the text split by the regex `tokenizer.ggml.pre` names.

use serde_json::{json, Value};
use tokenizers::models::bpe::{Vocab as BpeVocab, BPE};
use tokenizers::{DecoderWrapper, NormalizerWrapper, PreTokenizerWrapper, Tokenizer};

use super::tokenizer::{component, field_err, Vocab};
use super::Metadata;
use crate::error::Result;

const LLAMA3_SPLIT: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";
const QWEN2_SPLIT: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";
const QWEN35_SPLIT: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?[\p{L}\p{M}]+|\p{N}| ?[^\s\p{L}\p{M}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";
const TEKKEN_SPLIT: &str = concat!(
    r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+",
    r"|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*",
    r"|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+"
);
const GPT4O_SPLIT: &str = concat!(
    r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+(?i:'s|'t|'re|'ve|'m|'ll|'d)?",
    r"|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*(?i:'s|'t|'re|'ve|'m|'ll|'d)?",
    r"|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+"
);

/// The `tokenizer.ggml.pre` names supported, for the error message.
pub(crate) const SUPPORTED_PRE: &str = "default, gpt2, gpt-2, smollm, llama3, llama-v3, llama-bpe, falcon3, falcon-h1, pixtral, midm-2.0, \
lfm2, jina-v5-nano, dbrx, smaug-bpe, tekken, qwen2, deepseek-r1-qwen, kormo, f2llmv2, megrez, qwen35, gpt-4o, llama4, kanana2, \
talkie, minimax-m2";

/// The split regex for a pre-tokenizer name, as transformers' `GGUF_PRE_TOKENIZER_SPLITS`.
fn split_regex(pre: &str) -> Option<&'static str> {
    Some(match pre {
        "llama3" | "llama-v3" | "llama-bpe" | "falcon3" | "falcon-h1" | "pixtral" | "midm-2.0" | "lfm2" | "jina-v5-nano" | "dbrx" | "smaug-bpe" => LLAMA3_SPLIT,
        "tekken" => TEKKEN_SPLIT,
        "qwen2" | "deepseek-r1-qwen" | "kormo" | "f2llmv2" | "megrez" => QWEN2_SPLIT,
        "qwen35" => QWEN35_SPLIT,
        "gpt-4o" | "llama4" | "kanana2" | "talkie" | "minimax-m2" => GPT4O_SPLIT,
        _ => return None,
    })
}

/// The pre-tokenizer (as `tokenizer.json` describes one) for a `tokenizer.ggml.pre` name.
pub(crate) fn pre_tokenizer(pre: &str) -> Option<Value> {
    let byte_level = |use_regex: bool| json!({"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": true, "use_regex": use_regex});
    if let Some(regex) = split_regex(pre) {
        let split = json!({"type": "Split", "pattern": {"Regex": regex}, "behavior": "Isolated", "invert": false});
        return Some(json!({"type": "Sequence", "pretokenizers": [split, byte_level(false)]}));
    }
    match pre {
        // GPT-2's own regex, inside ByteLevel ("gpt-2" is llama.cpp's name for it).
        "default" | "gpt2" | "gpt-2" => Some(byte_level(true)),
        // SmolLM splits digits one by one before GPT-2's regex (its tokenizer.json and llama.cpp
        // agree; transformers' GGUF loader does not know the name and would drop the digit split).
        "smollm" => Some(json!({"type": "Sequence", "pretokenizers": [{"type": "Digits", "individual_digits": true}, byte_level(true)]})),
        _ => None,
    }
}

/// GPT-2's byte-to-character table: printable Latin-1 bytes stand for themselves, the others
/// for U+0100 onwards, in byte order.
fn byte_chars() -> [char; 256] {
    let mut table = ['\0'; 256];
    let mut next = 256u32;
    for b in 0..=255u8 {
        let printable = matches!(b, b'!'..=b'~' | 0xA1..=0xAC | 0xAE..=0xFF);
        table[b as usize] = if printable {
            b as char
        } else {
            next += 1;
            char::from_u32(next - 1).unwrap_or('\0')
        };
    }
    table
}

fn is_byte_char(c: char) -> bool {
    matches!(c as u32, 0x21..=0x7E | 0xA1..=0xAC | 0xAE..=0xFF | 0x100..=0x143)
}

/// Whether every character of `token` is one of the 256 of GPT-2's byte alphabet.
pub(crate) fn in_byte_alphabet(token: &str) -> bool {
    token.chars().all(is_byte_char)
}

/// `token` as the byte-level vocabulary spells it: unchanged when it already is, else its UTF-8
/// bytes through the byte alphabet (transformers' `byte_level_tokenizer`).
pub(crate) fn byte_level_spelling(token: &str) -> String {
    if in_byte_alphabet(token) {
        return token.to_string();
    }
    let table = byte_chars();
    token.bytes().map(|b| table[b as usize]).collect()
}

pub(crate) fn build_gpt2(meta: &Metadata, vocab: &Vocab) -> Result<Tokenizer> {
    let path = vocab.path;
    let pre = meta.str_opt("tokenizer.ggml.pre")?.unwrap_or("default");
    let pre_tokenizer =
        pre_tokenizer(pre).ok_or_else(|| field_err(path, "tokenizer.ggml.pre", format!("unsupported pre-tokenizer {pre:?} (supported: {SUPPORTED_PRE})")))?;
    let pre_tokenizer: PreTokenizerWrapper = component(path, "pre-tokenizer", pre_tokenizer)?;

    // Later duplicates win, as in a Python dict.
    let ids: BpeVocab = vocab.tokens.iter().enumerate().map(|(i, &t)| (byte_level_spelling(t), i as u32)).collect();
    let merge_strs = meta.str_array_opt("tokenizer.ggml.merges")?.ok_or_else(|| field_err(path, "tokenizer.ggml.merges", "missing"))?;
    let mut merges = Vec::with_capacity(merge_strs.len());
    for (i, m) in merge_strs.iter().enumerate() {
        let key = || format!("tokenizer.ggml.merges[{i}]");
        let mut parts = m.split(' ');
        let (Some(a), Some(b), None) = (parts.next(), parts.next(), parts.next()) else {
            return Err(field_err(path, &key(), format!("{m:?} is not two tokens separated by one space")));
        };
        for piece in [a, b, &format!("{a}{b}")] {
            if !ids.contains_key(piece) {
                return Err(field_err(path, &key(), format!("{m:?}: {piece:?} is not in tokenizer.ggml.tokens")));
            }
        }
        merges.push((a.to_string(), b.to_string()));
    }
    let bpe = BPE::builder().vocab_and_merges(ids, merges).build().map_err(|e| field_err(path, "tokenizer.ggml.merges", e.to_string()))?;
    let mut tokenizer = Tokenizer::new(bpe);
    tokenizer.with_normalizer(None::<NormalizerWrapper>);
    tokenizer.with_pre_tokenizer(Some(pre_tokenizer));
    let decoder: DecoderWrapper = component(path, "decoder", json!({"type": "ByteLevel", "add_prefix_space": true, "trim_offsets": true, "use_regex": true}))?;
    tokenizer.with_decoder(Some(decoder));
    Ok(tokenizer)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn byte_alphabet_is_gpt2s() {
        let table = byte_chars();
        assert_eq!(table[b' ' as usize], 'Ġ');
        assert_eq!(table[b'\n' as usize], 'Ċ');
        assert_eq!(table[b'a' as usize], 'a');
        let all: std::collections::HashSet<char> = table.iter().copied().collect();
        assert_eq!(all.len(), 256);
        assert!(table.iter().all(|&c| is_byte_char(c)));
        assert_eq!(byte_level_spelling("a b"), "aĠb");
        assert_eq!(byte_level_spelling("ĠHello"), "ĠHello");
    }
}
