//! Loading tokenizer.json, with the checks the tokenizers library leaves out: files it accepts
//! and then panics on, or asks gigabytes for, when the engine encodes a prompt. Found by
//! fuzzing (`model::fuzz`); each error names the field.

use std::collections::HashSet;
use std::path::Path;

use serde::Deserialize;
use serde_json::Value;
use tokenizers::Tokenizer;

use crate::error::EngineError;

/// The sections the library builds from before any check of ours can run (the vocabulary is
/// skipped unparsed).
#[derive(Deserialize)]
struct Sections {
    #[serde(default)]
    normalizer: Option<Value>,
    #[serde(default)]
    pre_tokenizer: Option<Value>,
    #[serde(default)]
    decoder: Option<Value>,
    #[serde(default)]
    added_tokens: Option<Value>,
}

/// The most Split/Replace patterns read. The library compiles each into a regular expression
/// (about 150 KB and half a millisecond for `\p{L}+`, up to the regex crate's 10 MB limit);
/// tokenizers use a handful.
const MAX_PATTERNS: usize = 32;

/// The longest added token read. The library's matcher for added tokens takes time quadratic
/// in a repetitive token's length (half a second for 4,000 a's); real ones are under 100 bytes.
const MAX_ADDED_TOKEN_BYTES: usize = 1024;

/// Before parsing: added tokens' lengths, the number of patterns, and every SentencePiece charsmap
/// (`precompiled_charsmap`) of the normalizer.
pub fn check_before_parse(bytes: &[u8]) -> Result<(), String> {
    let file: Sections = serde_json::from_slice(bytes).map_err(|e| format!("cannot parse: {e}"))?;
    for (i, t) in file.added_tokens.as_ref().and_then(Value::as_array).into_iter().flatten().enumerate() {
        let len = t.get("content").and_then(Value::as_str).map_or(0, str::len);
        if len > MAX_ADDED_TOKEN_BYTES {
            return Err(format!("added_tokens[{i}].content: {len} bytes; at most {MAX_ADDED_TOKEN_BYTES} are read"));
        }
    }
    for (name, section) in [("normalizer", &file.normalizer), ("pre_tokenizer", &file.pre_tokenizer), ("decoder", &file.decoder)] {
        let n = section.as_ref().map_or(0, patterns);
        if n > MAX_PATTERNS {
            return Err(format!("{name}: {n} patterns (Split, Replace), each compiled to a regular expression; at most {MAX_PATTERNS} are read"));
        }
    }
    let mut found = Vec::new();
    if let Some(n) = &file.normalizer {
        charsmaps(n, "normalizer", &mut found);
    }
    for (at, text) in found {
        // The library unwraps these two errors (a panic, not an error).
        #[allow(deprecated)]
        let blob = base64::decode(text).map_err(|e| format!("{at}: not base64: {e}"))?;
        check_charsmap(&blob).map_err(|e| format!("{at}: {e}"))?;
    }
    Ok(())
}

/// Objects with a `pattern` (tagged or not, the library reads them as Split or Replace).
fn patterns(v: &Value) -> usize {
    match v {
        Value::Object(o) => usize::from(o.contains_key("pattern")) + o.values().map(patterns).sum::<usize>(),
        Value::Array(a) => a.iter().map(patterns).sum(),
        _ => 0,
    }
}

fn charsmaps<'a>(v: &'a Value, at: &str, out: &mut Vec<(String, &'a str)>) {
    match v {
        Value::Object(o) => {
            for (k, x) in o {
                match (k.as_str(), x) {
                    ("precompiled_charsmap", Value::String(s)) => out.push((format!("{at}.{k}"), s)),
                    _ => charsmaps(x, &format!("{at}.{k}"), out),
                }
            }
        }
        Value::Array(a) => a.iter().enumerate().for_each(|(i, x)| charsmaps(x, &format!("{at}[{i}]"), out)),
        _ => {}
    }
}

/// A charsmap is a u32 trie size, a darts-clone double array of u32 units, then the
/// NUL-separated replacement texts. spm_precompiled reserves the claimed size before reading
/// it and indexes the array unchecked on every lookup, so: the claim must fit the blob, and
/// every lookup from every reachable node must land inside the array, every replacement
/// offset inside the text on a character boundary.
fn check_charsmap(blob: &[u8]) -> Result<(), String> {
    let size = blob.get(..4).map(|b| u32::from_le_bytes([b[0], b[1], b[2], b[3]]) as usize).ok_or("shorter than its 4-byte trie size")?;
    let units = size / 4;
    let Some(trie) = blob.get(4..4 + units * 4) else {
        return Err(format!("its trie claims {size} bytes, the charsmap holds {}", blob.len() - 4));
    };
    let text = std::str::from_utf8(&blob[4 + units * 4..]).map_err(|e| format!("its replacement text is not UTF-8: {e}"))?;
    let array: Vec<usize> = trie.chunks_exact(4).map(|b| u32::from_le_bytes([b[0], b[1], b[2], b[3]]) as usize).collect();
    let offset = |u: usize| (u >> 10) << ((u & (1 << 9)) >> 6);
    let root = *array.first().ok_or("its trie is empty")?;
    let mut todo = vec![offset(root)];
    let mut seen = HashSet::new();
    while let Some(base) = todo.pop() {
        if !seen.insert(base) {
            continue;
        }
        for c in 1..=255usize {
            let unit = *array.get(base ^ c).ok_or_else(|| format!("a lookup of byte {c} lands at {} past its {units}-unit trie", base ^ c))?;
            if unit & ((1 << 31) | 0xff) != c {
                continue;
            }
            let next = base ^ c ^ offset(unit);
            if (unit >> 8) & 1 == 1 {
                let leaf = *array.get(next).ok_or_else(|| format!("a value at {next} past its {units}-unit trie"))?;
                let at = leaf & ((1 << 31) - 1);
                if !text.is_char_boundary(at) {
                    return Err(format!("a replacement at byte {at} of its {}-byte text", text.len()));
                }
            }
            todo.push(next);
        }
    }
    Ok(())
}

/// After parsing: the decoder, as the library writes it back. Its Strip decoder panics on a
/// token made only of the stripped character when `stop` is not 0 (no converter writes one).
pub fn check_decoder(decoder: &Value, at: &str) -> Result<(), String> {
    match decoder.get("type").and_then(Value::as_str) {
        Some("Sequence") => {
            for (i, d) in decoder.get("decoders").and_then(Value::as_array).into_iter().flatten().enumerate() {
                check_decoder(d, &format!("{at}.decoders[{i}]"))?;
            }
        }
        Some("Strip") if decoder.get("stop").and_then(Value::as_u64) != Some(0) => {
            return Err(format!(
                "{at}.stop: {} is not supported (only 0: the library's Strip decoder panics past it)",
                decoder.get("stop").unwrap_or(&Value::Null)
            ));
        }
        _ => {}
    }
    Ok(())
}

/// After parsing: the post-processor, as the library writes it back. A template that names a
/// special token it does not define, or a second sequence in the single-sequence template,
/// panics on the first encode; so do special tokens with unequal ids and tokens.
pub fn check_post_processor(processor: &Value, at: &str) -> Result<(), String> {
    match processor.get("type").and_then(Value::as_str) {
        Some("Sequence") => {
            for (i, p) in processor.get("processors").and_then(Value::as_array).into_iter().flatten().enumerate() {
                check_post_processor(p, &format!("{at}.processors[{i}]"))?;
            }
        }
        Some("TemplateProcessing") => {
            let empty = serde_json::Map::new();
            let tokens = processor.get("special_tokens").and_then(Value::as_object).unwrap_or(&empty);
            for (name, t) in tokens {
                let len = |k: &str| t.get(k).and_then(Value::as_array).map_or(0, Vec::len);
                if len("ids") != len("tokens") {
                    return Err(format!("{at}.special_tokens.{name}: {} ids for {} tokens", len("ids"), len("tokens")));
                }
            }
            for which in ["single", "pair"] {
                for (i, piece) in processor.get(which).and_then(Value::as_array).into_iter().flatten().enumerate() {
                    if let Some(id) = piece.pointer("/SpecialToken/id").and_then(Value::as_str) {
                        if !tokens.contains_key(id) {
                            return Err(format!("{at}.{which}[{i}]: special token {id:?} is not in special_tokens"));
                        }
                    }
                    if which == "single" && piece.pointer("/Sequence/id").and_then(Value::as_str) == Some("B") {
                        return Err(format!("{at}.single[{i}]: the single-sequence template names sequence B"));
                    }
                }
            }
        }
        _ => {}
    }
    Ok(())
}

/// The tokenizer of tokenizer.json file `path`, whose contents are `bytes`.
pub fn tokenizer_from_bytes(path: &Path, bytes: &[u8]) -> crate::error::Result<Tokenizer> {
    let err = |message: String| EngineError::Tokenizer { path: path.to_path_buf(), message };
    check_before_parse(bytes).map_err(err)?;
    // The tokenizers library panics, rather than erring, on some malformed files (its
    // deserializers unwrap), e.g. a decoder nested past serde_json's recursion limit.
    let parsed = std::panic::catch_unwind(|| Tokenizer::from_bytes(bytes))
        .map_err(|p| err(format!("cannot parse: the tokenizers library failed on it ({})", crate::error::panic_message(p.as_ref()))))?;
    let mut tokenizer = parsed.map_err(|e| err(format!("cannot parse: {e}")))?;
    // The engine encodes one prompt at a time, whole: a file's padding would pad every prompt
    // (to a length it names: 10^9 asks for gigabytes) and its truncation would cut prompts
    // silently. transformers ignores both unless a call asks for them; so does the engine.
    tokenizer.with_padding(None);
    tokenizer.with_truncation(None).map_err(|e| err(format!("cannot drop its truncation: {e}")))?;
    // Checked as the library writes them back, whichever of its spellings the file used.
    if let Some(d) = tokenizer.get_decoder() {
        let written = serde_json::to_value(d).map_err(|e| err(format!("cannot write its decoder back: {e}")))?;
        check_decoder(&written, "decoder").map_err(err)?;
    }
    if let Some(p) = tokenizer.get_post_processor() {
        let written = serde_json::to_value(p).map_err(|e| err(format!("cannot write its post_processor back: {e}")))?;
        check_post_processor(&written, "post_processor").map_err(err)?;
    }
    Ok(tokenizer)
}
