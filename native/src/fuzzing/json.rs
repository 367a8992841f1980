//! Structure-aware mutation of JSON files (config.json, the index, tokenizer.json, safetensors
//! headers). Byte flips almost only hit serde_json's syntax errors, so most inputs are the seed
//! parsed, edited as a tree (types swapped, numbers at the limits of every conversion, keys
//! dropped, renamed and invented, containers grown, nested, emptied) and written back; a tenth
//! are byte-mutated text.

use rand::Rng;
use serde_json::{Map, Number, Value};

use super::{bytes, FuzzRng};

/// The words a target's loader gives meaning to.
pub struct Dict {
    pub keys: &'static [&'static str],
    pub strings: &'static [&'static str],
}

const INTEGERS: [i128; 30] = [
    0,
    1,
    -1,
    2,
    3,
    7,
    8,
    16,
    31,
    64,
    255,
    256,
    65535,
    65536,
    1 << 24,
    (1 << 24) + 1,
    (1 << 31) - 1,
    1 << 31,
    (1 << 32) - 1,
    1 << 32,
    1 << 53,
    (1 << 53) + 1,
    1_000_000_000,
    1_000_000_000_000_000_000,
    i64::MAX as i128,
    i64::MIN as i128,
    u64::MAX as i128,
    u64::MAX as i128 - 1,
    -(1 << 31),
    -(1 << 53),
];
const FLOATS: [f64; 14] = [0.5, -0.5, 1.5, -0.0, 1e-6, 1e-300, 5e-324, 1e9, 1e18, 1e19, 1e300, -1e300, 3.4e38, f64::MAX];
/// Number texts a `Value` cannot hold, put in as raw text: non-finite, out of range, malformed.
const RAW: [&str; 14] = [
    "NaN",
    "Infinity",
    "-Infinity",
    "1e999",
    "-1e999",
    "1e-999",
    "18446744073709551616",
    "-9223372036854775809",
    "123456789012345678901234567890",
    "-0",
    "00",
    "1.",
    "0x10",
    "+1",
];
/// Marks a string that stands for one of `RAW` until the text is written.
const MARK: char = '\u{1}';
const STRINGS: [&str; 12] = ["", " ", "\u{0}", "é", "🙂", "\u{FFFD}", "null", "true", "0", "-1", "NaN", "\\"];
/// The most bytes a grown container may add (inputs stay small enough to check quickly).
const GROW_BYTES: usize = 256 << 10;

/// Replaces `out` with a mutated copy of a random seed.
pub fn mutate(rng: &mut FuzzRng, corpus: &[Vec<u8>], dict: &Dict, out: &mut Vec<u8>) {
    let parsed = bytes::pick(rng, corpus).and_then(|seed| serde_json::from_slice::<Value>(seed).ok());
    match parsed {
        Some(mut v) if !rng.gen_bool(0.1) => {
            for _ in 0..rng.gen_range(1..=4) {
                mutate_value(rng, dict, &mut v);
            }
            write(rng, &v, out);
        }
        _ => bytes::mutate(rng, corpus, out),
    }
}

/// `v` as JSON text (compact or pretty), raw number texts put in.
pub fn write(rng: &mut FuzzRng, v: &Value, out: &mut Vec<u8>) {
    let text = if rng.gen_bool(0.3) { serde_json::to_string_pretty(v) } else { serde_json::to_string(v) }.unwrap_or_default();
    out.clear();
    if !text.contains("\\u0001") {
        out.extend_from_slice(text.as_bytes());
        return;
    }
    let mut text = text;
    for raw in RAW {
        text = text.replace(&format!("\"\\u0001{raw}\""), raw);
    }
    out.extend_from_slice(text.as_bytes());
}

pub fn number(rng: &mut FuzzRng) -> Value {
    if rng.gen_bool(0.7) {
        let i = INTEGERS[rng.gen_range(0..INTEGERS.len())];
        let n = u64::try_from(i).map(Number::from).or_else(|_| i64::try_from(i).map(Number::from));
        Value::Number(n.unwrap_or_else(|_| Number::from(0)))
    } else {
        Number::from_f64(FLOATS[rng.gen_range(0..FLOATS.len())]).map_or(Value::Null, Value::Number)
    }
}

fn raw(rng: &mut FuzzRng) -> Value {
    Value::String(format!("{MARK}{}", RAW[rng.gen_range(0..RAW.len())]))
}

pub fn string(rng: &mut FuzzRng, dict: &Dict) -> String {
    match rng.gen_range(0..8) {
        0 => STRINGS[rng.gen_range(0..STRINGS.len())].to_string(),
        1 => "a".repeat(rng.gen_range(100..5000)),
        2 if !dict.keys.is_empty() => dict.keys[rng.gen_range(0..dict.keys.len())].to_string(),
        _ if !dict.strings.is_empty() => dict.strings[rng.gen_range(0..dict.strings.len())].to_string(),
        _ => String::new(),
    }
}

/// A value of a random type.
pub fn scalar(rng: &mut FuzzRng, dict: &Dict) -> Value {
    match rng.gen_range(0..8) {
        0 => Value::Null,
        1 => Value::Bool(rng.gen()),
        2 | 3 => number(rng),
        4 | 5 => Value::String(string(rng, dict)),
        6 => Value::Array(vec![]),
        _ => Value::Object(Map::new()),
    }
}

fn key(rng: &mut FuzzRng, dict: &Dict) -> String {
    match dict.keys.get(rng.gen_range(0..dict.keys.len().max(1))) {
        Some(k) if rng.gen_bool(0.9) => k.to_string(),
        _ => string(rng, dict),
    }
}

/// Nodes of `v` down to `depth` levels below it (`v` itself included).
fn count(v: &Value, depth: usize) -> usize {
    1 + match v {
        Value::Array(a) if depth > 0 => a.iter().map(|x| count(x, depth - 1)).sum(),
        Value::Object(o) if depth > 0 => o.values().map(|x| count(x, depth - 1)).sum(),
        _ => 0,
    }
}

/// The `k`-th node of `v` in pre-order, `depth` levels down at most.
fn nth<'a>(v: &'a mut Value, k: &mut usize, depth: usize) -> Option<&'a mut Value> {
    if *k == 0 {
        return Some(v);
    }
    *k -= 1;
    if depth == 0 {
        return None;
    }
    match v {
        Value::Array(a) => a.iter_mut().find_map(|x| nth(x, k, depth - 1)),
        Value::Object(o) => o.values_mut().find_map(|x| nth(x, k, depth - 1)),
        _ => None,
    }
}

/// One mutation of a random node of `v`; half the time a node near the top (the fields that
/// choose types and settings rather than vocabulary entries).
pub fn mutate_value(rng: &mut FuzzRng, dict: &Dict, v: &mut Value) {
    let depth = if rng.gen_bool(0.5) { 3 } else { usize::MAX };
    let op = rng.gen_range(0..12);
    // A copy of some other node, for the copy operator.
    let donor = if op == 9 {
        let mut k = rng.gen_range(0..count(v, usize::MAX));
        nth(v, &mut k, usize::MAX).map(|d| d.clone())
    } else {
        None
    };
    let mut k = rng.gen_range(0..count(v, depth));
    let Some(node) = nth(v, &mut k, depth) else { return };
    match (op, node) {
        (0, node) => *node = number(rng),
        (1, node) => *node = raw(rng),
        (3, node) => *node = Value::String(string(rng, dict)),
        (4, node @ Value::Number(_)) => {
            let x = node.as_f64().unwrap_or(0.0);
            let y = match rng.gen_range(0..4) {
                0 => x + rng.gen_range(-3..=3) as f64,
                1 => x * 2.0,
                2 => -x,
                _ => x * 1e6,
            };
            // Integers stay integers where they fit, so the loader's integer paths see them.
            *node = if y.fract() == 0.0 && y.abs() < 9e15 { Value::Number((y as i64).into()) } else { Number::from_f64(y).map_or(Value::Null, Value::Number) };
        }
        (4, Value::String(s)) => match rng.gen_range(0..4) {
            0 => s.truncate(s.floor_char_boundary(rng.gen_range(0..=s.len()))),
            1 => s.push_str(STRINGS[rng.gen_range(0..STRINGS.len())]),
            2 => *s = s.repeat(rng.gen_range(2..=8)),
            _ => *s = s.to_uppercase(),
        },
        (4, Value::Bool(b)) => *b = !*b,
        (5, Value::Array(a)) if !a.is_empty() => {
            a.remove(rng.gen_range(0..a.len()));
        }
        (5, Value::Object(o)) if !o.is_empty() => {
            let k = o.keys().nth(rng.gen_range(0..o.len())).cloned().unwrap_or_default();
            o.remove(&k);
        }
        (6, Value::Array(a)) => {
            let x = if !a.is_empty() && rng.gen_bool(0.5) { a[rng.gen_range(0..a.len())].clone() } else { scalar(rng, dict) };
            a.insert(rng.gen_range(0..=a.len()), x);
        }
        (6, Value::Object(o)) => {
            let x = scalar(rng, dict);
            o.insert(key(rng, dict), x);
        }
        (7, Value::Array(a)) if !a.is_empty() => {
            let x = a[rng.gen_range(0..a.len())].clone();
            let n = grow_count(rng, &x);
            a.extend(std::iter::repeat_n(x, n));
        }
        (7, Value::Object(o)) if !o.is_empty() => {
            let (k, x) = o.iter().nth(rng.gen_range(0..o.len())).map(|(k, x)| (k.clone(), x.clone())).unwrap_or_default();
            for i in 0..grow_count(rng, &x) {
                o.insert(format!("{k}.{i}"), x.clone());
            }
        }
        (8, node) => {
            // Nesting: shallow, or past serde_json's recursion limit (128).
            let levels = if rng.gen_bool(0.8) { 1 } else { rng.gen_range(100..300) };
            for _ in 0..levels {
                let inner = std::mem::take(node);
                *node = if rng.gen_bool(0.5) { Value::Array(vec![inner]) } else { Value::Object(Map::from_iter([(key(rng, dict), inner)])) };
            }
        }
        (9, node) => *node = donor.unwrap_or(Value::Null),
        (10, Value::Object(o)) if !o.is_empty() => {
            let k = o.keys().nth(rng.gen_range(0..o.len())).cloned().unwrap_or_default();
            if let Some(x) = o.remove(&k) {
                o.insert(key(rng, dict), x);
            }
        }
        (11, Value::Array(a)) => {
            if rng.gen_bool(0.5) {
                a.clear();
            } else {
                a.reverse();
            }
        }
        (11, Value::Object(o)) => o.clear(),
        (_, node) => *node = scalar(rng, dict),
    }
}

/// How many copies of `x` to add: up to a few thousand, within `GROW_BYTES`.
fn grow_count(rng: &mut FuzzRng, x: &Value) -> usize {
    let size = serde_json::to_vec(x).map_or(1, |b| b.len().max(1));
    let want = if rng.gen_bool(0.7) { rng.gen_range(1..=8) } else { rng.gen_range(1..=4000) };
    want.min(GROW_BYTES / size).max(1)
}
