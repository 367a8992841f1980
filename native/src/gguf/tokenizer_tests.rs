//! Tests of `tokenizer`: fixtures that transformers computed from GGUF metadata
//! (`tests/fixtures/gguf_tokenizer/make.py`), a byte-level vocabulary checked against its own
//! `tokenizer.json`, and malformed metadata.

use std::path::PathBuf;

use serde_json::Value;
use tokenizers::{OffsetReferential, OffsetType, PreTokenizedString, PreTokenizer};

use super::tokenizer::{from_metadata, GgufTokenizer};
use super::{MetaValue, Metadata};
use crate::error::EngineError;

fn repo_file(rel: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..").join(rel)
}

/// JSON as GGUF would type it: integers u32 (i32 if negative), floats f32.
fn meta_value(v: &Value) -> MetaValue {
    match v {
        Value::Bool(b) => MetaValue::Bool(*b),
        Value::String(s) => MetaValue::Str(s.clone()),
        Value::Number(n) if n.is_u64() => MetaValue::U32(n.as_u64().unwrap() as u32),
        Value::Number(n) if n.is_i64() => MetaValue::I32(n.as_i64().unwrap() as i32),
        Value::Number(n) => MetaValue::F32(n.as_f64().unwrap() as f32),
        Value::Array(a) => MetaValue::Array(a.iter().map(meta_value).collect()),
        other => panic!("no GGUF value for {other}"),
    }
}

fn metadata(v: &Value) -> Metadata {
    let values = v.as_object().unwrap().iter().map(|(k, v)| (k.clone(), meta_value(v))).collect();
    Metadata { path: PathBuf::from("test.gguf"), values }
}

/// Every case of every fixture in `file`: ids with special tokens added, and both decodings.
fn check_fixtures(file: &std::path::Path) -> usize {
    let fixtures: Value = serde_json::from_str(&std::fs::read_to_string(file).unwrap()).unwrap();
    let mut checked = 0;
    for fx in fixtures.as_array().unwrap() {
        let name = fx["name"].as_str().unwrap();
        let start = std::time::Instant::now();
        let tok = from_metadata(&metadata(&fx["metadata"])).unwrap_or_else(|e| panic!("{name}: {e}"));
        eprintln!("{name}: built in {:?}", start.elapsed());
        let mut failures = Vec::new();
        for case in fx["cases"].as_array().unwrap() {
            let text = case["text"].as_str().unwrap();
            let want: Vec<u32> = serde_json::from_value(case["ids"].clone()).unwrap();
            let got = tok.tokenizer.encode(text, true).unwrap().get_ids().to_vec();
            if got != want {
                failures.push(format!("encode {text:?}: got {got:?}, want {want:?}"));
                continue;
            }
            if let Some(want) = case.get("splits") {
                let mut pts = PreTokenizedString::from(text);
                tok.tokenizer.get_pre_tokenizer().unwrap().pre_tokenize(&mut pts).unwrap();
                let got: Vec<&str> = pts.get_splits(OffsetReferential::Original, OffsetType::Byte).into_iter().map(|(s, _, _)| s).collect();
                let want: Vec<&str> = want.as_array().unwrap().iter().map(|s| s.as_str().unwrap()).collect();
                if got != want {
                    failures.push(format!("pre-tokenize {text:?}: got {got:?}, want {want:?}"));
                }
            }
            for (key, skip) in [("decoded", false), ("decoded_skip", true)] {
                let got = tok.tokenizer.decode(&want, skip).unwrap();
                if got != case[key].as_str().unwrap() {
                    failures.push(format!("decode (skip special {skip}) {text:?}: got {got:?}, want {:?}", case[key]));
                }
            }
            checked += 1;
        }
        assert!(failures.is_empty(), "{name}: {} of {} cases differ:\n{}", failures.len(), fx["cases"].as_array().unwrap().len(), failures.join("\n"));
    }
    checked
}

#[test]
fn sentencepiece_vocabulary_matches_transformers() {
    assert!(check_fixtures(&repo_file("tests/fixtures/gguf_tokenizer/spm.json")) > 30);
}

#[test]
fn byte_level_vocabulary_matches_transformers() {
    assert!(check_fixtures(&repo_file("tests/fixtures/gguf_tokenizer/bpe.json")) > 50);
}

/// The whole Gemma 3 vocabulary and a few hundred strings, and the same strings on the byte-level
/// fixtures (`make.py GGUF --full OUT` writes OUT and OUT.bpe.json); not committed, so this runs
/// only where UPG_GGUF_TOKENIZER_FULL names those files (separated by ':').
#[test]
fn full_vocabulary_from_env() {
    let Some(paths) = std::env::var_os("UPG_GGUF_TOKENIZER_FULL") else { return };
    for path in std::env::split_paths(&paths) {
        let n = check_fixtures(&path);
        eprintln!("{}: {n} cases match", path.display());
    }
}

/// llama-tiny's `tokenizer.json` (byte-level BPE, GPT-2 split) as GGUF metadata: the built
/// tokenizer must encode and decode as the original does.
#[test]
fn byte_level_matches_its_tokenizer_json() {
    let file = repo_file("tests/fixtures/models/llama-tiny/tokenizer.json");
    let original = tokenizers::Tokenizer::from_file(&file).unwrap();
    let json: Value = serde_json::from_str(&std::fs::read_to_string(&file).unwrap()).unwrap();
    assert_eq!(json["pre_tokenizer"]["type"], "ByteLevel");
    assert_eq!(json["pre_tokenizer"]["use_regex"], true);
    let vocab = json["model"]["vocab"].as_object().unwrap();
    let mut tokens = vec![String::new(); vocab.len()];
    for (t, id) in vocab {
        tokens[id.as_u64().unwrap() as usize] = t.clone();
    }
    let special: Vec<u64> = json["added_tokens"].as_array().unwrap().iter().map(|a| a["id"].as_u64().unwrap()).collect();
    let types: Vec<MetaValue> = (0..tokens.len() as u64).map(|i| MetaValue::I32(if special.contains(&i) { 3 } else { 1 })).collect();
    let merges: Vec<MetaValue> = json["model"]["merges"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| {
            MetaValue::Str(m.as_array().map(|p| format!("{} {}", p[0].as_str().unwrap(), p[1].as_str().unwrap())).unwrap_or_else(|| m.as_str().unwrap().into()))
        })
        .collect();
    let mut meta = Metadata { path: "llama-tiny.gguf".into(), ..Default::default() };
    let v = &mut meta.values;
    v.insert("tokenizer.ggml.model".into(), MetaValue::Str("gpt2".into()));
    v.insert("tokenizer.ggml.pre".into(), MetaValue::Str("gpt2".into()));
    v.insert("tokenizer.ggml.tokens".into(), MetaValue::Array(tokens.into_iter().map(MetaValue::Str).collect()));
    v.insert("tokenizer.ggml.token_type".into(), MetaValue::Array(types));
    v.insert("tokenizer.ggml.merges".into(), MetaValue::Array(merges));
    v.insert("tokenizer.ggml.bos_token_id".into(), MetaValue::U32(0));
    v.insert("tokenizer.ggml.eos_token_id".into(), MetaValue::U32(1));
    v.insert("tokenizer.ggml.add_bos_token".into(), MetaValue::Bool(false)); // its post-processor adds nothing
    let built = from_metadata(&meta).unwrap();
    assert_eq!(built.bos_token_id, Some(0));
    assert_eq!(built.eos_token_ids, vec![1]);
    assert_eq!(built.special_tokens, vec![("bos_token".into(), "<|bos|>".into()), ("eos_token".into(), "<|eos|>".into())]);
    let texts = [
        "The capital of France is",
        "  leading and   inner   spaces  ",
        "line\nbreaks\n\n\r\n and\ttabs",
        "I'm sure they'll say it's 12345 or 3.14!",
        "日本語 🙂 café",
        "<|bos|>special<|eos|> inside",
        "def f(x):\n    return x ** 2",
        "",
    ];
    for text in texts {
        let want = original.encode(text, true).unwrap();
        let got = built.tokenizer.encode(text, true).unwrap();
        assert_eq!(got.get_ids(), want.get_ids(), "{text:?}");
        for skip in [false, true] {
            assert_eq!(built.tokenizer.decode(got.get_ids(), skip).unwrap(), original.decode(want.get_ids(), skip).unwrap(), "{text:?}");
        }
    }
}

/// A small SentencePiece-style vocabulary built by hand.
fn spm_meta(arch: &str) -> Metadata {
    let mut tokens: Vec<String> = ["<unk>", "<s>", "</s>", "<ctl>", "<user>"].iter().map(|s| s.to_string()).collect();
    tokens.extend((0..=255u8).map(|b| format!("<0x{b:02X}>")));
    tokens.extend(["▁", "a", "b", "ab", "▁ab", "▁a"].iter().map(|s| s.to_string()));
    let n = tokens.len();
    let types = (0..n).map(|i| match i {
        0 => 2,
        1..=3 => 3,
        4 => 4,
        5..=260 => 6,
        _ => 1,
    });
    let mut meta = Metadata { path: "spm.gguf".into(), ..Default::default() };
    let v = &mut meta.values;
    v.insert("general.architecture".into(), MetaValue::Str(arch.into()));
    v.insert("tokenizer.ggml.model".into(), MetaValue::Str("llama".into()));
    v.insert("tokenizer.ggml.tokens".into(), MetaValue::Array(tokens.into_iter().map(MetaValue::Str).collect()));
    v.insert("tokenizer.ggml.scores".into(), MetaValue::Array((0..n).map(|i| MetaValue::F32(-(i as f32))).collect()));
    v.insert("tokenizer.ggml.token_type".into(), MetaValue::Array(types.map(MetaValue::I32).collect()));
    v.insert("tokenizer.ggml.bos_token_id".into(), MetaValue::U32(1));
    v.insert("tokenizer.ggml.eos_token_id".into(), MetaValue::U32(2));
    v.insert("tokenizer.ggml.eot_token_id".into(), MetaValue::U32(3));
    v.insert("tokenizer.ggml.unknown_token_id".into(), MetaValue::U32(0));
    v.insert("tokenizer.chat_template".into(), MetaValue::Str("{{ bos_token }}".into()));
    meta
}

fn ids(tok: &GgufTokenizer, text: &str, special: bool) -> Vec<u32> {
    tok.tokenizer.encode(text, special).unwrap().get_ids().to_vec()
}

#[test]
fn sentencepiece_prefix_bos_and_special_ids() {
    let meta = spm_meta("llama");
    let tok = from_metadata(&meta).unwrap();
    let (sp, a, b, ab, sp_ab, sp_a) = (261, 262, 263, 264, 265, 266);
    assert_eq!(ids(&tok, "ab a", true), vec![1, sp_ab, sp_a]);
    assert_eq!(ids(&tok, "ab a", false), vec![sp_ab, sp_a]);
    assert_eq!(ids(&tok, "ba<ctl>", false), vec![sp, b, a, 3]);
    assert_eq!(ids(&tok, "é", false), vec![sp, 5 + 0xC3, 5 + 0xA9]); // byte fallback
    assert_eq!(tok.tokenizer.decode(&[1, sp_ab, sp_a, 5 + 0xC3, 5 + 0xA9], true).unwrap(), "ab aé");
    assert_eq!(tok.bos_token_id, Some(1));
    assert_eq!(tok.eos_token_ids, vec![2, 3]);
    assert_eq!(tok.chat_template.as_deref(), Some("{{ bos_token }}"));
    assert_eq!(tok.special_tokens, vec![("bos_token".into(), "<s>".into()), ("eos_token".into(), "</s>".into()), ("unk_token".into(), "<unk>".into())]);

    // No prefix space, no BOS, an EOS: as the file says.
    let mut meta = spm_meta("llama");
    meta.values.insert("tokenizer.ggml.add_space_prefix".into(), MetaValue::Bool(false));
    meta.values.insert("tokenizer.ggml.add_bos_token".into(), MetaValue::Bool(false));
    meta.values.insert("tokenizer.ggml.add_eos_token".into(), MetaValue::Bool(true));
    let tok = from_metadata(&meta).unwrap();
    assert_eq!(ids(&tok, "ab a", true), vec![ab, sp_a, 2]);
    assert_eq!(tok.tokenizer.decode(&[sp_a, ab], false).unwrap(), " aab");
}

fn err_of(meta: &Metadata) -> String {
    match from_metadata(meta) {
        Ok(_) => panic!("malformed metadata was accepted"),
        Err(e @ EngineError::ConfigField { .. }) => e.to_string(),
        Err(e) => panic!("wrong error kind: {e}"),
    }
}

#[test]
fn malformed_metadata_names_the_key() {
    let with = |edit: &dyn Fn(&mut Metadata)| {
        let mut m = spm_meta("llama");
        edit(&mut m);
        err_of(&m)
    };
    let cases: Vec<(String, &str)> = vec![
        (with(&|m| drop(m.values.remove("tokenizer.ggml.model"))), "`tokenizer.ggml.model`: missing"),
        (with(&|m| drop(m.values.insert("tokenizer.ggml.model".into(), MetaValue::Str("rwkv".into())))), "`tokenizer.ggml.model`: unsupported"),
        (with(&|m| drop(m.values.insert("tokenizer.ggml.model".into(), MetaValue::U32(1)))), "`tokenizer.ggml.model`: expected a string"),
        (with(&|m| drop(m.values.remove("tokenizer.ggml.tokens"))), "`tokenizer.ggml.tokens`: missing"),
        (with(&|m| drop(m.values.insert("tokenizer.ggml.tokens".into(), MetaValue::Array(vec![])))), "`tokenizer.ggml.tokens`: is empty"),
        (with(&|m| drop(m.values.insert("tokenizer.ggml.tokens".into(), MetaValue::Array(vec![MetaValue::U8(1)])))), "`tokenizer.ggml.tokens[0]`"),
        (
            with(&|m| drop(m.values.insert("tokenizer.ggml.scores".into(), MetaValue::Array(vec![MetaValue::F32(0.0)])))),
            "`tokenizer.ggml.scores`: has 1 entries for 267 tokens",
        ),
        (with(&|m| drop(m.values.remove("tokenizer.ggml.scores"))), "`tokenizer.ggml.scores`: missing"),
        (
            with(&|m| drop(m.values.insert("tokenizer.ggml.token_type".into(), MetaValue::Array(vec![MetaValue::I32(1)])))),
            "`tokenizer.ggml.token_type`: has 1 entries",
        ),
        (
            with(&|m| {
                if let Some(MetaValue::Array(t)) = m.values.get_mut("tokenizer.ggml.token_type") {
                    t[7] = MetaValue::I32(9);
                }
            }),
            "`tokenizer.ggml.token_type[7]`: unknown token type 9",
        ),
        (
            with(&|m| drop(m.values.insert("tokenizer.ggml.bos_token_id".into(), MetaValue::U32(267)))),
            "`tokenizer.ggml.bos_token_id`: token id 267 is out of range",
        ),
        (
            with(&|m| drop(m.values.insert("tokenizer.ggml.eot_token_id".into(), MetaValue::I32(-1)))),
            "`tokenizer.ggml.eot_token_id`: expected a non-negative integer",
        ),
        (with(&|m| drop(m.values.insert("tokenizer.ggml.add_bos_token".into(), MetaValue::U8(1)))), "`tokenizer.ggml.add_bos_token`: expected a bool"),
        (
            with(&|m| {
                m.values.remove("tokenizer.ggml.bos_token_id");
                m.values.insert("tokenizer.ggml.add_bos_token".into(), MetaValue::Bool(true));
            }),
            "`tokenizer.ggml.bos_token_id`: missing",
        ),
        (with(&|m| drop(m.values.insert("tokenizer.ggml.merges".into(), MetaValue::Array(vec![MetaValue::Str("a c".into())])))), "`tokenizer.ggml.merges[0]`"),
        (
            with(&|m| {
                m.values.insert("tokenizer.ggml.model".into(), MetaValue::Str("gpt2".into()));
                m.values.insert("tokenizer.ggml.merges".into(), MetaValue::Array(vec![]));
                m.values.insert("tokenizer.ggml.pre".into(), MetaValue::Str("mystery".into()));
            }),
            "`tokenizer.ggml.pre`: unsupported pre-tokenizer \"mystery\"",
        ),
        (
            with(&|m| {
                m.values.insert("tokenizer.ggml.model".into(), MetaValue::Str("gpt2".into()));
                m.values.insert("tokenizer.ggml.merges".into(), MetaValue::Array(vec![MetaValue::Str("a b".into()), MetaValue::Str("ab".into())]));
            }),
            "`tokenizer.ggml.merges[1]`: \"ab\" is not two tokens",
        ),
        (
            with(&|m| {
                m.values.insert("tokenizer.ggml.model".into(), MetaValue::Str("gpt2".into()));
                m.values.remove("tokenizer.ggml.merges");
            }),
            "`tokenizer.ggml.merges`: missing",
        ),
    ];
    for (got, want) in cases {
        assert!(got.contains(want) && got.starts_with("spm.gguf: field"), "error {got:?} does not contain {want:?}");
    }
}

#[test]
fn well_known_end_of_turn_tokens_end_generation() {
    let mut meta = spm_meta("gemma3");
    let v = &mut meta.values;
    v.remove("tokenizer.ggml.eot_token_id");
    let MetaValue::Array(tokens) = v.get_mut("tokenizer.ggml.tokens").unwrap() else { unreachable!() };
    tokens[3] = MetaValue::Str("<end_of_turn>".into()); // control (type 3)
    tokens[266] = MetaValue::Str("<|im_end|>".into()); // a normal token: its text alone is not enough
    let tok = from_metadata(&meta).unwrap();
    assert_eq!(tok.eos_token_ids, vec![2, 3]);
}
