//! Fuzz targets of the Hugging Face folder loaders (driven by `crate::fuzzing`): the
//! safetensors header, config.json (and generation_config.json's EOS ids), the shard index and
//! tokenizer.json. Each `check` runs the loader's own function on the bytes and, when it
//! accepts, the guarantees the engine relies on.

use std::collections::HashSet;
use std::io;
use std::path::{Component, Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use rand::Rng;
use serde_json::Value;

use super::checkpoint::{shard_files, Checkpoint};
use super::config::{parse_json_object, token_ids, ModelConfig, RopeScaling, MAX_LAYERS, MAX_RMS_NORM_EPS, MAX_ROPE_FACTOR};
use super::rope::Rope;
use crate::model::tokenizer_file::tokenizer_from_bytes;
use crate::fuzzing::bytes::{self, INTERESTING_U64};
use crate::fuzzing::json::{self, Dict};
use crate::fuzzing::{corpus_dir, FuzzRng, Target};

/// The four targets (the index one owns a temporary model folder).
pub fn targets() -> io::Result<Vec<Box<dyn Target>>> {
    Ok(vec![Box::new(Safetensors), Box::new(Config), Box::new(Index::new()?), Box::new(TokenizerFile)])
}

pub struct Safetensors;

#[rustfmt::skip]
const SAFETENSORS_DICT: Dict = Dict {
    keys: &[
        "dtype", "shape", "data_offsets", "__metadata__", "format", "model.embed_tokens.weight", "model.layers.1.input_layernorm.weight",
    ],
    strings: &[
        "F32", "F16", "BF16", "F64", "I64", "I32", "I16", "I8", "U8", "U16", "U32", "U64", "BOOL", "F8_E4M3", "F8_E5M2", "F4", "F6_E2M3", "E8M0", "f32",
        "pt",
    ],
};

/// The JSON header and the data of a well-formed safetensors file.
fn split_safetensors(file: &[u8]) -> Option<(&[u8], &[u8])> {
    let n = usize::try_from(u64::from_le_bytes(file.get(..8)?.try_into().ok()?)).ok()?;
    Some((file.get(8..8usize.checked_add(n)?)?, file.get(8 + n..)?))
}

/// Points one tensor's data_offsets, shape or dtype at the edges: empty, past the data,
/// reversed, overlapping another tensor, products that overflow.
fn mutate_tensor_entry(rng: &mut FuzzRng, header: &mut Value, data_len: u64) {
    let Value::Object(map) = header else { return };
    let ends: Vec<u64> =
        map.values().filter_map(|t| t.get("data_offsets")?.as_array().map(|o| o.iter().filter_map(Value::as_u64).collect::<Vec<_>>())).flatten().collect();
    let names: Vec<String> = map.keys().filter(|k| *k != "__metadata__").cloned().collect();
    let Some(name) = bytes::pick(rng, &names) else { return };
    let Some(Value::Object(t)) = map.get_mut(name) else { return };
    let edge = |rng: &mut FuzzRng| -> u64 {
        match rng.gen_range(0..5) {
            0 => data_len.wrapping_add(rng.gen_range(0..3)),
            1 => bytes::pick(rng, &ends).copied().unwrap_or(0).wrapping_add_signed(rng.gen_range(-2..=2)),
            2 => INTERESTING_U64[rng.gen_range(0..INTERESTING_U64.len())],
            _ => rng.gen_range(0..=data_len),
        }
    };
    match rng.gen_range(0..3) {
        0 => {
            let (a, b) = (edge(rng), edge(rng));
            t.insert("data_offsets".into(), Value::from(vec![a, b]));
        }
        1 => {
            let dims = rng.gen_range(0..=4);
            let shape: Vec<u64> = (0..dims).map(|_| if rng.gen_bool(0.6) { rng.gen_range(0..=4) } else { edge(rng) }).collect();
            t.insert("shape".into(), Value::from(shape));
        }
        _ => {
            t.insert("dtype".into(), Value::from(json::string(rng, &SAFETENSORS_DICT)));
        }
    }
}

impl Target for Safetensors {
    fn name(&self) -> &'static str {
        "safetensors"
    }

    fn extension(&self) -> &'static str {
        "safetensors"
    }

    fn mutate(&self, rng: &mut FuzzRng, corpus: &[Vec<u8>], out: &mut Vec<u8>) {
        let seed = bytes::pick(rng, corpus).and_then(|s| split_safetensors(s));
        let parsed = seed.and_then(|(h, d)| Some((serde_json::from_slice::<Value>(h).ok()?, d)));
        let Some((mut header, data)) = parsed.filter(|_| rng.gen_bool(0.7)) else { return bytes::mutate(rng, corpus, out) };
        for _ in 0..rng.gen_range(1..=3) {
            if rng.gen_bool(0.5) {
                mutate_tensor_entry(rng, &mut header, data.len() as u64);
            } else {
                json::mutate_value(rng, &SAFETENSORS_DICT, &mut header);
            }
        }
        let mut text = Vec::new();
        json::write(rng, &header, &mut text);
        if rng.gen_bool(0.5) {
            text.resize(text.len().next_multiple_of(8), b' ');
        }
        let len = match rng.gen_range(0..10) {
            0 => INTERESTING_U64[rng.gen_range(0..INTERESTING_U64.len())],
            1 => (text.len() as u64).wrapping_add_signed(rng.gen_range(-9..=9)),
            _ => text.len() as u64,
        };
        out.clear();
        out.extend_from_slice(&len.to_le_bytes());
        out.extend_from_slice(&text);
        match rng.gen_range(0..8) {
            0 => out.extend_from_slice(&data[..rng.gen_range(0..=data.len())]),
            1 => out.extend((0..data.len() + rng.gen_range(1..64)).map(|_| rng.gen::<u8>())),
            _ => out.extend_from_slice(data),
        }
    }

    fn check(&self, file: &[u8]) -> Result<bool, String> {
        let mut ckpt = Checkpoint::empty();
        if ckpt.add_safetensors(PathBuf::from("model.safetensors"), Arc::new(file.to_vec())).is_err() {
            return Ok(false);
        }
        let data_start = split_safetensors(file).map(|(h, _)| 8 + h.len()).ok_or("accepted a file without a whole header")?;
        let mut ranges = Vec::new();
        let mut names = HashSet::new();
        for (name, index, dtype, shape, range) in ckpt.entries() {
            // In order, as safetensors multiplies: [huge, 0] holds 0 elements.
            let size = shape.iter().try_fold(1usize, |p, &d| p.checked_mul(d)).and_then(|n| n.checked_mul(dtype.block().1));
            let ok = index == 0
                && range.start >= data_start
                && range.start <= range.end
                && range.end <= file.len()
                && size == Some(range.len())
                && names.insert(name);
            if !ok {
                return Err(format!("accepted tensor {name:?} {dtype:?} {shape:?} at {range:?} in a {}-byte file", file.len()));
            }
            // The engine reads an accepted tensor through this view.
            let viewed = ckpt.tensor(name, shape).map(|t| t.bytes().len());
            if viewed.as_ref().ok() != Some(&range.len()) {
                return Err(format!("tensor {name:?}: view {:?}", viewed.err()));
            }
            ranges.push(range);
        }
        ranges.retain(|r| !r.is_empty());
        ranges.sort_unstable_by_key(|r| r.start);
        if ranges.windows(2).any(|w| w[0].end > w[1].start) {
            return Err("accepted overlapping tensors".into());
        }
        Ok(true)
    }
}

pub struct Config;

#[rustfmt::skip]
const CONFIG_DICT: Dict = Dict {
    keys: &[
        "architectures", "model_type", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads", "head_dim",
        "vocab_size", "max_position_embeddings", "rms_norm_eps", "rope_theta", "rope_scaling", "rope_parameters", "rope_type", "type", "factor",
        "low_freq_factor", "high_freq_factor", "original_max_position_embeddings", "tie_word_embeddings", "attention_bias", "mlp_bias", "sliding_window",
        "use_sliding_window", "bos_token_id", "eos_token_id", "dtype", "torch_dtype", "hidden_act", "hidden_activation", "layer_types",
        "sliding_window_pattern", "_sliding_window_pattern", "rope_local_base_freq", "query_pre_attn_scalar", "final_logit_softcapping",
        "attn_logit_softcapping", "use_bidirectional_attention", "full_attention", "sliding_attention",
    ],
    strings: &[
        "LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM", "Gemma3ForCausalLM", "Gemma3ForConditionalGeneration", "llama", "mistral", "qwen2",
        "gemma3_text", "silu", "gelu_pytorch_tanh", "gelu", "default", "linear", "llama3", "dynamic", "yarn", "float32", "bfloat16", "float16",
        "sliding_attention", "full_attention",
    ],
};

impl Target for Config {
    fn name(&self) -> &'static str {
        "config"
    }

    fn extension(&self) -> &'static str {
        "json"
    }

    fn mutate(&self, rng: &mut FuzzRng, corpus: &[Vec<u8>], out: &mut Vec<u8>) {
        json::mutate(rng, corpus, &CONFIG_DICT, out)
    }

    fn check(&self, file: &[u8]) -> Result<bool, String> {
        let path = Path::new("config.json");
        // read_json_object reads text: a file that is not UTF-8 is refused before parsing.
        let Ok(obj) = std::str::from_utf8(file).map_err(drop).and_then(|t| parse_json_object(path, t).map_err(drop)) else { return Ok(false) };
        // generation_config.json's EOS ids go through the same reader.
        let _ = token_ids(Path::new("generation_config.json"), "eos_token_id", obj.get("eos_token_id"));
        let Ok(c) = ModelConfig::from_object(path, &obj) else { return Ok(false) };
        let dims = [
            c.hidden_size,
            c.intermediate_size,
            c.num_hidden_layers,
            c.num_attention_heads,
            c.num_key_value_heads,
            c.head_dim,
            c.vocab_size,
            c.max_position_embeddings,
        ];
        let positive = |x: f64| x.is_finite() && x > 0.0;
        let rope_ok = match &c.rope_scaling {
            RopeScaling::None => true,
            RopeScaling::Linear { factor } => positive(*factor) && *factor <= MAX_ROPE_FACTOR,
            RopeScaling::Llama3 { factor, low_freq_factor, high_freq_factor, original_max_position_embeddings } => {
                [*factor, *low_freq_factor, *high_freq_factor, *original_max_position_embeddings].into_iter().all(positive)
                    && high_freq_factor > low_freq_factor
            }
            RopeScaling::Factors(f) => f.iter().copied().all(positive),
        };
        let b = &c.blocks;
        let ok = dims.iter().all(|&d| (1..=1 << 24).contains(&d))
            && c.num_hidden_layers <= MAX_LAYERS
            && c.num_attention_heads.is_multiple_of(c.num_key_value_heads)
            && c.head_dim.is_multiple_of(2)
            && c.rms_norm_eps > 0.0
            && c.rms_norm_eps <= MAX_RMS_NORM_EPS
            && positive(c.rope_theta)
            && rope_ok
            && c.sliding_window.is_none_or(|w| w >= 1)
            && b.sliding_layers.as_ref().is_none_or(|s| s.len() == c.num_hidden_layers)
            && b.rope_local_theta.is_none_or(positive)
            && positive(b.attn_scale as f64)
            && b.embed_scale.is_none_or(|s| positive(s as f64));
        if !ok {
            return Err(format!("accepted an unusable config: {c:?}"));
        }
        // Per-layer queries the decoder makes.
        for l in 0..c.num_hidden_layers {
            let _ = (c.layer_window(l), c.layer_rope_table(l));
        }
        // Rotary angles at the first and last positions must be finite (the tables are built
        // once the weights match the config, so only for head sizes a checkpoint could hold).
        if c.head_dim <= 4096 {
            let mut ropes = vec![Rope::new(c.head_dim, c.rope_theta, &c.rope_scaling)];
            ropes.extend(b.rope_local_theta.map(|t| Rope::new(c.head_dim, t, &RopeScaling::None)));
            for pos in [0, 1, c.max_position_embeddings - 1] {
                for r in &ropes {
                    let (cos, sin) = r.table(pos);
                    if !cos.iter().chain(&sin).all(|x| x.is_finite()) {
                        return Err(format!("accepted a config whose rotary table at position {pos} is not finite: {c:?}"));
                    }
                }
            }
        }
        Ok(true)
    }
}

/// The index target: the index's text is checked as the loader reads it, then, if accepted,
/// written into a temporary model folder (holding the seed shards) and opened as a checkpoint.
/// A decoy shard lies beside the folder and in a subfolder: no accepted index may reach them.
pub struct Index {
    root: PathBuf,
    dir: PathBuf,
}

#[rustfmt::skip]
const INDEX_DICT: Dict = Dict {
    keys: &[
        "weight_map", "metadata", "total_size", "model.embed_tokens.weight", "lm_head.weight",
    ],
    strings: &[
        "model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors", "model.safetensors", "model.safetensors.index.json", "../decoy.safetensors",
        "sub/decoy.safetensors", "sub", "/etc/passwd", "/tmp", "..", ".", "", "./model-00001-of-00002.safetensors", "model-00001-of-00002.safetensors/",
        "..\\decoy.safetensors", "C:\\decoy.safetensors", "~/decoy.safetensors", "model-00001-of-00002.safetensors\u{0}", "decoy.safetensors",
    ],
};

impl Index {
    pub fn new() -> io::Result<Self> {
        static N: AtomicU64 = AtomicU64::new(0);
        let root = std::env::temp_dir().join(format!("upg-fuzz-index-{}-{}", std::process::id(), N.fetch_add(1, Ordering::Relaxed)));
        let dir = root.join("model");
        std::fs::create_dir_all(dir.join("sub"))?;
        let seeds = corpus_dir("index");
        let mut shards: Vec<PathBuf> =
            std::fs::read_dir(&seeds)?.filter_map(|e| Some(e.ok()?.path())).filter(|p| p.extension().is_some_and(|x| x == "safetensors")).collect();
        shards.sort();
        for shard in &shards {
            std::fs::copy(shard, dir.join(shard.file_name().unwrap_or_default()))?;
        }
        if let Some(first) = shards.first() {
            std::fs::copy(first, root.join("decoy.safetensors"))?;
            std::fs::copy(first, dir.join("sub/decoy.safetensors"))?;
        }
        Ok(Index { root, dir })
    }
}

impl Drop for Index {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.root);
    }
}

/// Whether `name` is one plain file name (not empty, no separator, not `.` or `..`, not a root).
fn plain_name(name: &std::ffi::OsStr) -> bool {
    let mut parts = Path::new(name).components();
    matches!((parts.next(), parts.next()), (Some(Component::Normal(n)), None) if n == name)
}

impl Target for Index {
    fn name(&self) -> &'static str {
        "index"
    }

    fn extension(&self) -> &'static str {
        "json"
    }

    fn mutate(&self, rng: &mut FuzzRng, corpus: &[Vec<u8>], out: &mut Vec<u8>) {
        json::mutate(rng, corpus, &INDEX_DICT, out)
    }

    fn check(&self, file: &[u8]) -> Result<bool, String> {
        let index = self.dir.join("model.safetensors.index.json");
        let Ok(text) = std::str::from_utf8(file) else { return Ok(false) };
        let Ok(files) = shard_files(&index, text) else { return Ok(false) };
        for f in &files {
            if f.parent() != Some(self.dir.as_path()) || !f.file_name().is_some_and(plain_name) {
                return Err(format!("accepted shard path {} outside {}", f.display(), self.dir.display()));
            }
        }
        std::fs::write(&index, file).map_err(|e| format!("cannot write {}: {e}", index.display()))?;
        let Ok(ckpt) = Checkpoint::open(&self.dir) else { return Ok(false) };
        match ckpt.files().iter().find(|f| f.parent() != Some(self.dir.as_path())) {
            Some(f) => Err(format!("opened {} outside {}", f.display(), self.dir.display())),
            None => Ok(true),
        }
    }
}

pub struct TokenizerFile;

#[rustfmt::skip]
const TOKENIZER_DICT: Dict = Dict {
    keys: &[
        "version", "truncation", "padding", "added_tokens", "normalizer", "pre_tokenizer", "post_processor", "decoder", "model", "type", "vocab", "merges",
        "unk_token", "unk_id", "byte_fallback", "fuse_unk", "dropout", "continuing_subword_prefix", "end_of_word_suffix", "ignore_merges",
        "max_input_chars_per_word", "normalizers", "pretokenizers", "decoders", "processors", "pattern", "String", "Regex", "content", "behavior", "invert",
        "replacement", "prepend_scheme", "split", "add_prefix_space", "trim_offsets", "use_regex", "single", "pair", "special_tokens", "SpecialToken",
        "Sequence", "id", "ids", "tokens", "type_id", "max_length", "stride", "strategy", "direction", "pad_to_multiple_of", "pad_id", "pad_type_id",
        "pad_token", "Fixed", "special", "lstrip", "rstrip", "normalized", "single_word", "precompiled_charsmap", "prepend", "start", "stop", "sep", "cls",
        "individual_digits", "clean_text", "handle_chinese_chars", "strip_accents", "lowercase", "strip_left", "strip_right", "prefix", "cleanup",
        "delimiter",
    ],
    strings: &[
        "BPE", "WordPiece", "WordLevel", "Unigram", "Sequence", "NFC", "NFD", "NFKC", "NFKD", "Lowercase", "Strip", "StripAccents", "Replace", "Prepend",
        "Precompiled", "BertNormalizer", "ByteLevel", "Metaspace", "Whitespace", "WhitespaceSplit", "Split", "Punctuation", "Digits", "CharDelimiterSplit",
        "UnicodeScripts", "BertPreTokenizer", "TemplateProcessing", "BertProcessing", "RobertaProcessing", "ByteFallback", "Fuse", "CTC", "BPEDecoder",
        "Removed", "Isolated", "MergedWithPrevious", "MergedWithNext", "Contiguous", "always", "never", "first", "Left", "Right", "LongestFirst",
        "OnlyFirst", "BatchLongest", "A", "B", "<unk>", "<s>", "</s>", "[UNK]", "▁", "Ġ", "##", "<0x41>", "\\s+", "(a+)+$", "(?=a)", "(\\w+)\\1", "\\p{L}+",
        "[", "a{1000}{1000}", "AAAAAA==", "AAEAAA==", "////", "hello", "Ａ",
    ],
};

/// Mutates the bytes inside a seed's SentencePiece charsmap (base64 in the JSON): its trie size
/// and units are little-endian u32s, as the byte-level operators expect. False if the seed has none.
fn mutate_charsmap(rng: &mut FuzzRng, corpus: &[Vec<u8>], out: &mut Vec<u8>) -> bool {
    fn find(v: &mut Value) -> Option<&mut Value> {
        match v {
            Value::Object(o) => {
                if o.contains_key("precompiled_charsmap") {
                    return o.get_mut("precompiled_charsmap");
                }
                o.values_mut().find_map(find)
            }
            Value::Array(a) => a.iter_mut().find_map(find),
            _ => None,
        }
    }
    let Some(mut v) = bytes::pick(rng, corpus).and_then(|s| serde_json::from_slice::<Value>(s).ok()) else { return false };
    let Some(node) = find(&mut v) else { return false };
    #[allow(deprecated)]
    let Some(mut blob) = node.as_str().and_then(|t| base64::decode(t).ok()) else {
        return false;
    };
    for _ in 0..rng.gen_range(1..=4) {
        bytes::mutate_once(rng, &[], &mut blob);
    }
    #[allow(deprecated)]
    let text = base64::encode(&blob);
    *node = Value::String(text);
    json::write(rng, &v, out);
    true
}

/// What the engine tokenizes: prompts, stop strings, chat markup; and text that makes
/// backtracking regexes and normalizers work.
const TEXTS: [&str; 7] = [
    "Hello, world! hello world",
    "",
    "  spaces  and\ttabs\nlines\r\n",
    "héllo wörld 日本語 🙂 Ａﬁ ١٢٣ e\u{301}",
    "<|bos|>hi<|eos|><s></s>[CLS]<unk>",
    "aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaab 12345678901234567890",
    "\u{0}\u{7f}\u{feff}\u{200b}\u{fffd}",
];

impl Target for TokenizerFile {
    fn name(&self) -> &'static str {
        "tokenizer"
    }

    fn extension(&self) -> &'static str {
        "json"
    }

    fn mutate(&self, rng: &mut FuzzRng, corpus: &[Vec<u8>], out: &mut Vec<u8>) {
        if rng.gen_bool(0.1) && mutate_charsmap(rng, corpus, out) {
            return;
        }
        json::mutate(rng, corpus, &TOKENIZER_DICT, out)
    }

    fn check(&self, file: &[u8]) -> Result<bool, String> {
        let Ok(tok) = tokenizer_from_bytes(Path::new("tokenizer.json"), file) else { return Ok(false) };
        // As the engine uses it: encode prompts, decode what came out and ids from a model.
        for text in TEXTS {
            if let Ok(enc) = tok.encode(text, true) {
                let _ = tok.decode(enc.get_ids(), true);
                let _ = tok.decode(enc.get_ids(), false);
            }
        }
        let _ = tok.decode(&[0, 1, 2, 3, 65, 255, 256, 300, 511, 512, 1 << 20, u32::MAX], true);
        Ok(true)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fuzzing::bounded_test;

    // A few thousand inputs per target (the fuzz_model_files example runs longer passes).
    #[test]
    fn safetensors_survives_bounded_fuzzing() {
        bounded_test(&Safetensors, 0x5afe, 20_000);
    }

    #[test]
    fn config_survives_bounded_fuzzing() {
        bounded_test(&Config, 0xc0f1, 20_000);
    }

    #[test]
    fn index_survives_bounded_fuzzing() {
        bounded_test(&Index::new().unwrap(), 0x1dec, 5_000);
    }

    #[test]
    fn tokenizer_survives_bounded_fuzzing() {
        bounded_test(&TokenizerFile, 0x70c, 5_000);
    }
}
