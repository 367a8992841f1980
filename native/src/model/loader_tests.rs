//! Regression tests for what fuzzing the Hugging Face folder loaders (`model::fuzz`) found:
//! before its fix, each input here was accepted, panicked, or asked for gigabytes.

use std::panic::catch_unwind;
use std::path::Path;

use serde_json::{json, Value};
use tokenizers::Tokenizer;

use super::checkpoint::shard_files;
use super::config::ModelConfig;
use crate::model::tokenizer_file::tokenizer_from_bytes;
use crate::fuzzing::corpus_dir;

fn seed(target: &str, name: &str) -> Value {
    serde_json::from_slice(&std::fs::read(corpus_dir(target).join(name)).unwrap()).unwrap()
}

/// The error of config seed `name` edited by `edit`.
fn config_err(name: &str, edit: impl FnOnce(&mut Value)) -> String {
    let mut v = seed("config", name);
    edit(&mut v);
    let obj = v.as_object().unwrap();
    ModelConfig::from_object(Path::new("config.json"), obj).expect_err("accepted").to_string()
}

#[test]
fn config_refuses_what_makes_rotary_angles_or_the_attention_scale_infinite() {
    // A factor of 5e-324 divided every frequency into infinity (NaN angles at position 0).
    let e = config_err("llama3-tiny.json", |c| c["rope_scaling"]["factor"] = json!(5e-324));
    assert!(e.contains("field `rope_scaling.factor`: must be at least 1"), "{e}");
    let e = config_err("llama-linear-rope.json", |c| c["rope_parameters"]["factor"] = json!(0.5));
    assert!(e.contains("field `rope_parameters.factor`: must be at least 1"), "{e}");
    let e = config_err("llama-tiny.json", |c| c["rope_parameters"]["rope_theta"] = json!(5e-324));
    assert!(e.contains("field `rope_parameters.rope_theta`: must be at least 1"), "{e}");
    let e = config_err("gemma3-t4.json", |c| c["rope_local_base_freq"] = json!(0.5));
    assert!(e.contains("field `rope_local_base_freq`: must be at least 1"), "{e}");
    // 1/sqrt(5e-324) is infinite in f32.
    let e = config_err("gemma3-t4.json", |c| c["query_pre_attn_scalar"] = json!(5e-324));
    assert!(e.contains("field `query_pre_attn_scalar`: must be between 1 and"), "{e}");
}

#[test]
fn config_refuses_a_layer_count_before_sizing_anything_by_it() {
    // Gemma 3's per-layer table took 16 MB for 2^24 layers, before any other check.
    let e = config_err("gemma3-t4.json", |c| c["num_hidden_layers"] = json!(1 << 24));
    assert!(e.contains("field `num_hidden_layers`: 16777216 layers; at most 1024"), "{e}");
    let mut v = seed("config", "gemma3-t4.json");
    v["num_hidden_layers"] = json!(1024);
    assert!(ModelConfig::from_object(Path::new("config.json"), v.as_object().unwrap()).is_ok());
}

#[test]
fn index_refuses_an_empty_shard_name() {
    // "" joined to the folder named the folder itself as a shard.
    let e = shard_files(Path::new("m/model.safetensors.index.json"), r#"{"weight_map": {"a.weight": ""}}"#).unwrap_err().to_string();
    assert!(e.contains("field `weight_map.a.weight`: \"\" is not a plain file name"), "{e}");
}

fn load(v: &Value) -> crate::error::Result<Tokenizer> {
    tokenizer_from_bytes(Path::new("tokenizer.json"), &serde_json::to_vec(v).unwrap())
}

fn refused(v: &Value) -> String {
    let e = load(v).expect_err("accepted").to_string();
    assert!(e.starts_with("tokenizer tokenizer.json: "), "{e}");
    e
}

/// Whether the tokenizers library itself, given `v`, panics (rather than erring) when it loads
/// it, encodes `text` and decodes the result.
fn library_panics(v: &Value, text: &str) -> bool {
    let bytes = serde_json::to_vec(v).unwrap();
    catch_unwind(|| {
        if let Ok(t) = Tokenizer::from_bytes(&bytes) {
            if let Ok(e) = t.encode(text, true) {
                let _ = (t.decode(e.get_ids(), true), t.decode(e.get_ids(), false));
            }
        }
    })
    .is_err()
}

#[test]
fn tokenizer_files_the_library_panics_on_while_loading_are_refused() {
    // Its decoder deserializer unwraps serde_json's recursion-limit error.
    let mut v = seed("tokenizer", "spm-bpe-byte-fallback.json");
    let mut d = json!({"type": "Fuse"});
    for _ in 0..130 {
        d = json!({"type": "Sequence", "decoders": [d]});
    }
    v["decoder"] = d;
    assert!(refused(&v).contains("cannot parse: recursion limit exceeded"));
    assert!(library_panics(&v, ""));
    // It unwraps a charsmap that is not base64, or whose text is not UTF-8.
    let mut v = seed("tokenizer", "unigram-precompiled.json");
    let at = "/normalizer/normalizers/0/precompiled_charsmap";
    *v.pointer_mut(at).unwrap() = json!("!!!!");
    assert!(refused(&v).contains("normalizer.normalizers[0].precompiled_charsmap: not base64"));
    assert!(library_panics(&v, ""));
    *v.pointer_mut(at).unwrap() = json!("AAAAAP8=");
    assert!(refused(&v).contains("precompiled_charsmap: its replacement text is not UTF-8"));
    assert!(library_panics(&v, ""));
}

#[test]
fn tokenizer_padding_and_truncation_are_dropped() {
    // Fixed padding to 10^9 asked for 4 GB on the first encode; truncation cut prompts.
    let mut v = seed("tokenizer", "wordpiece-bert.json");
    v["padding"]["strategy"] = json!({"Fixed": 1_000_000_000u64});
    v["truncation"]["max_length"] = json!(3);
    let ids = load(&v).unwrap().encode("hello world hello world", true).unwrap().get_ids().to_vec();
    assert_eq!(ids, [2, 4, 5, 4, 5, 3]);
}

#[test]
fn tokenizer_charsmaps_are_checked_before_the_library_reads_them() {
    let v = seed("tokenizer", "unigram-precompiled.json");
    let at = "/normalizer/normalizers/0/precompiled_charsmap";
    #[allow(deprecated)]
    let blob = base64::decode(v.pointer(at).and_then(Value::as_str).unwrap()).unwrap();
    let with = |blob: &[u8]| {
        let mut v = v.clone();
        #[allow(deprecated)]
        let text = base64::encode(blob);
        *v.pointer_mut(at).unwrap() = json!(text);
        v
    };
    // The seed (Ａ → A, ﬁ → fi) loads and normalizes.
    let tokens = load(&v).unwrap().encode("Ａﬁ", false).unwrap().get_tokens().to_vec();
    assert_eq!(tokens, ["▁", "A", "fi"]);
    // A trie size of 4 GB: the library reserved it before reading a byte.
    let mut b = blob.clone();
    b[..4].copy_from_slice(&u32::MAX.to_le_bytes());
    assert!(refused(&with(&b)).contains("normalizer.normalizers[0].precompiled_charsmap: its trie claims 4294967295 bytes"));
    // An empty trie, read at index 0 on the first lookup.
    assert!(refused(&with(&[0; 4])).contains("its trie is empty"));
    assert!(library_panics(&with(&[0; 4]), "a"));
    // The root's child for byte 0xEF sends lookups past the trie.
    let mut b = blob.clone();
    b[4 + 4 * 0xEF..][..4].copy_from_slice(&(0xEFu32 | (1 << 30)).to_le_bytes());
    assert!(refused(&with(&b)).contains("past its 1536-unit trie"));
    assert!(library_panics(&with(&b), "Ａ"));
    // Ａ's replacement (the value unit of its last node, block 5) points past the text.
    let mut b = blob.clone();
    b[4 + 4 * 256 * 5..][..4].copy_from_slice(&((1u32 << 31) | 999).to_le_bytes());
    assert!(refused(&with(&b)).contains("a replacement at byte 999 of its 5-byte text"));
    assert!(library_panics(&with(&b), "Ａ"));
}

#[test]
fn tokenizer_decoders_and_templates_that_panic_on_use_are_refused() {
    let v = seed("tokenizer", "spm-bpe-byte-fallback.json");
    let edited = |f: &dyn Fn(&mut Value)| {
        let mut v = v.clone();
        f(&mut v);
        v
    };
    // Strip with stop 2 reads before the start of a decoded "  " (" " encodes to "▁▁").
    let strip = edited(&|v| v["decoder"]["decoders"][3]["stop"] = json!(2));
    assert!(refused(&strip).contains("decoder.decoders[3].stop: 2 is not supported"));
    assert!(library_panics(&strip, " "));
    // The single-sequence template names a special token it does not define.
    let missing = edited(&|v| v["post_processor"]["single"][0]["SpecialToken"]["id"] = json!("<x>"));
    assert!(refused(&missing).contains("post_processor.single[0]: special token \"<x>\" is not in special_tokens"));
    assert!(library_panics(&missing, "hello"));
    // ... or a second sequence, which a single prompt does not have.
    let b = edited(&|v| v["post_processor"]["single"][1]["Sequence"]["id"] = json!("B"));
    assert!(refused(&b).contains("post_processor.single[1]: the single-sequence template names sequence B"));
    assert!(library_panics(&b, "hello"));
    let uneven = edited(&|v| v["post_processor"]["special_tokens"]["<s>"]["ids"] = json!([1, 2]));
    assert!(refused(&uneven).contains("post_processor.special_tokens.<s>: 2 ids for 1 tokens"));
}

#[test]
fn tokenizer_work_the_library_does_per_byte_of_file_is_bounded() {
    let v = seed("tokenizer", "wordlevel-split.json");
    // 4,000 a's took the library's added-token matcher half a second (quadratic in length).
    let mut long = v.clone();
    long["added_tokens"][0]["content"] = json!("a".repeat(1025));
    assert!(refused(&long).contains("added_tokens[0].content: 1025 bytes; at most 1024"));
    // 2,600 copies of a Split pattern compiled to 378 MB from a 265 KB file.
    let mut many = v.clone();
    let split = many["pre_tokenizer"]["pretokenizers"][0].clone();
    many["pre_tokenizer"]["pretokenizers"] = json!(vec![split; 33]);
    assert!(refused(&many).contains("pre_tokenizer: 33 patterns (Split, Replace)"));
}
