//! Tests of the GGUF reader: round trips through a small writer, and one test per kind of
//! corruption.

use super::*;

/// (name, dims, ggml type, offset in the data section, data bytes)
type Entry = (Vec<u8>, Vec<u64>, u32, u64, usize);

/// A minimal GGUF writer: fields are public so that tests can corrupt them.
struct Writer {
    version: u32,
    kvs: Vec<(Vec<u8>, MetaValue)>,
    tensors: Vec<Entry>,
    alignment: usize,
}

fn put_str(out: &mut Vec<u8>, s: &[u8]) {
    out.extend((s.len() as u64).to_le_bytes());
    out.extend(s);
}

fn put_value(out: &mut Vec<u8>, v: &MetaValue) {
    use MetaValue as V;
    match v {
        V::U8(x) => out.push(*x),
        V::I8(x) => out.extend(x.to_le_bytes()),
        V::U16(x) => out.extend(x.to_le_bytes()),
        V::I16(x) => out.extend(x.to_le_bytes()),
        V::U32(x) => out.extend(x.to_le_bytes()),
        V::I32(x) => out.extend(x.to_le_bytes()),
        V::F32(x) => out.extend(x.to_le_bytes()),
        V::Bool(x) => out.push(*x as u8),
        V::Str(s) => put_str(out, s.as_bytes()),
        V::Array(items) => {
            out.extend(items.first().map_or(0, MetaValue::type_id).to_le_bytes());
            out.extend((items.len() as u64).to_le_bytes());
            items.iter().for_each(|i| put_value(out, i));
        }
        V::U64(x) => out.extend(x.to_le_bytes()),
        V::I64(x) => out.extend(x.to_le_bytes()),
        V::F64(x) => out.extend(x.to_le_bytes()),
    }
}

impl Writer {
    fn new() -> Self {
        Writer { version: 3, kvs: Vec::new(), tensors: Vec::new(), alignment: 32 }
    }

    fn kv(mut self, key: &str, v: MetaValue) -> Self {
        self.kvs.push((key.as_bytes().to_vec(), v));
        self
    }

    /// Appends a tensor after the previous one, at the next aligned offset.
    fn tensor(mut self, name: &str, dims: &[u64], ggml_type: u32) -> Self {
        let (per_block, block_bytes) = ggml_format(ggml_type).map_or((1, 1), WeightFormat::block);
        let bytes = dims.iter().product::<u64>() as usize / per_block * block_bytes;
        let offset = self.tensors.last().map_or(0, |t| (t.3 as usize + t.4).next_multiple_of(self.alignment)) as u64;
        self.tensors.push((name.as_bytes().to_vec(), dims.to_vec(), ggml_type, offset, bytes));
        self
    }

    fn bytes(&self) -> Vec<u8> {
        let mut out = b"GGUF".to_vec();
        out.extend(self.version.to_le_bytes());
        out.extend((self.tensors.len() as u64).to_le_bytes());
        out.extend((self.kvs.len() as u64).to_le_bytes());
        for (k, v) in &self.kvs {
            put_str(&mut out, k);
            out.extend(v.type_id().to_le_bytes());
            put_value(&mut out, v);
        }
        for (name, dims, ty, offset, _) in &self.tensors {
            put_str(&mut out, name);
            out.extend((dims.len() as u32).to_le_bytes());
            dims.iter().for_each(|d| out.extend(d.to_le_bytes()));
            out.extend(ty.to_le_bytes());
            out.extend(offset.to_le_bytes());
        }
        let data = out.len().next_multiple_of(self.alignment);
        // Data at offsets past 1 MiB (corrupt ones) is left out.
        for (i, (_, _, _, offset, n)) in self.tensors.iter().enumerate().filter(|(_, t)| t.3 < 1 << 20) {
            let at = data + *offset as usize;
            out.resize(out.len().max(at + n), 0);
            out[at..at + n].iter_mut().enumerate().for_each(|(j, b)| *b = (i * 31 + j) as u8);
        }
        out
    }
}

fn small() -> Writer {
    Writer::new().kv("general.architecture", MetaValue::Str("llama".into())).tensor("a", &[4, 2], 0).tensor("b", &[32, 3], 8)
}

fn parse_ok(w: &Writer) -> (u32, Metadata, usize, Vec<TensorInfo>) {
    parse(Path::new("t.gguf"), &w.bytes()).unwrap()
}

/// The error of parsing `bytes`, checked to contain each of `parts`.
fn err(bytes: &[u8], parts: &[&str]) {
    let e = parse(Path::new("t.gguf"), bytes).expect_err("parse should fail").to_string();
    for p in parts {
        assert!(e.contains(p), "error {e:?} should contain {p:?}");
    }
}

#[test]
fn metadata_of_every_type_round_trips() {
    use MetaValue as V;
    let values = [
        V::U8(200),
        V::I8(-100),
        V::U16(60000),
        V::I16(-30000),
        V::U32(u32::MAX),
        V::I32(i32::MIN),
        V::F32(1.5),
        V::Bool(true),
        V::Str("héllo".into()),
        V::Array(vec![V::Str("a".into()), V::Str(String::new()), V::Str("ü".into())]),
        V::U64(u64::MAX),
        V::I64(i64::MIN),
        V::F64(-2.25),
        V::Array(vec![V::Array(vec![V::I32(1), V::I32(2)]), V::Array(vec![V::I32(3)])]),
        V::Array(vec![]),
    ];
    let mut w = Writer::new();
    for (i, v) in values.iter().enumerate() {
        w = w.kv(&format!("k.{i:02}"), v.clone());
    }
    let (version, meta, alignment, tensors) = parse_ok(&w);
    assert_eq!((version, alignment, tensors.len()), (3, 32, 0));
    assert_eq!(meta.values.values().cloned().collect::<Vec<_>>(), values);
    assert_eq!(meta.path, Path::new("t.gguf"));
    w.version = 2;
    assert_eq!(parse_ok(&w).0, 2);
}

#[test]
fn tensors_of_every_format_round_trip() {
    let mut w = Writer::new().kv("general.alignment", MetaValue::U32(64));
    w.alignment = 64;
    let shapes: [(u32, &[u64], WeightFormat); 8] = [
        (0, &[3, 2], WeightFormat::F32),
        (1, &[5], WeightFormat::F16),
        (30, &[2, 2, 2], WeightFormat::Bf16),
        (8, &[64, 2], WeightFormat::Q8_0),
        (2, &[32, 1, 2, 1], WeightFormat::Q4_0),
        (6, &[32], WeightFormat::Q5_0),
        (12, &[256, 2], WeightFormat::Q4K),
        (14, &[512], WeightFormat::Q6K),
    ];
    for (i, (ty, dims, _)) in shapes.iter().enumerate() {
        w = w.tensor(&format!("t{i}"), dims, *ty);
    }
    let bytes = w.bytes();
    let (_, _, alignment, tensors) = parse(Path::new("t.gguf"), &bytes).unwrap();
    assert_eq!(alignment, 64);
    let data = tensors[0].start;
    assert_eq!(data % 64, 0);
    for (i, (t, (_, dims, format))) in tensors.iter().zip(&shapes).enumerate() {
        assert_eq!((t.name.as_str(), t.format), (format!("t{i}").as_str(), *format));
        assert_eq!(t.dims, dims.iter().map(|&d| d as usize).collect::<Vec<_>>());
        assert_eq!(t.start, data + w.tensors[i].3 as usize);
        assert_eq!(t.end - t.start, w.tensors[i].4);
        let expected: Vec<u8> = (0..w.tensors[i].4).map(|j| (i * 31 + j) as u8).collect();
        assert_eq!(&bytes[t.start..t.end], expected.as_slice());
    }
}

#[test]
fn open_maps_and_finds_tensors() {
    let path = std::env::temp_dir().join(format!("upg-gguf-reader-{}.gguf", std::process::id()));
    std::fs::write(&path, small().bytes()).unwrap();
    let f = GgufFile::open(&path);
    std::fs::remove_file(&path).unwrap();
    let f = f.unwrap();
    assert_eq!(f.metadata.str_opt("general.architecture").unwrap(), Some("llama"));
    let b = f.tensor("b").unwrap();
    assert_eq!((b.format, f.bytes(b).len(), b.elements()), (WeightFormat::Q8_0, 3 * 34, 96));
    assert!(f.tensor("c").is_none());
}

#[test]
fn refuses_bad_magic_v1_and_big_endian() {
    let mut b = small().bytes();
    b[0] = b'X';
    err(&b, &["not a GGUF file", "XGUF"]);
    err(b"GG", &["magic", "truncated"]);
    let mut w = small();
    w.version = 1;
    err(&w.bytes(), &["version", "version 1 is not supported"]);
    w.version = 3u32.swap_bytes();
    err(&w.bytes(), &["version", "big-endian"]);
    w.version = 4;
    err(&w.bytes(), &["unsupported GGUF version 4"]);
}

#[test]
fn every_truncation_is_an_error() {
    let b = small().kv("k", MetaValue::Array(vec![MetaValue::Str("x".into())])).bytes();
    for n in 0..b.len() {
        assert!(parse(Path::new("t.gguf"), &b[..n]).is_err(), "prefix of {n} bytes accepted");
    }
    assert!(parse(Path::new("t.gguf"), &b).is_ok());
}

#[test]
fn refuses_huge_counts_and_lengths() {
    let b = small().bytes();
    let mut h = b.clone();
    h[8..16].copy_from_slice(&u64::MAX.to_le_bytes());
    err(&h, &["tensor_count", "cannot fit"]);
    h = b.clone();
    h[16..24].copy_from_slice(&(1u64 << 60).to_le_bytes());
    err(&h, &["kv_count", "cannot fit"]);
    // The first key's length.
    h = b.clone();
    h[24..32].copy_from_slice(&u64::MAX.to_le_bytes());
    err(&h, &["metadata key #0", "string length 18446744073709551615 cannot fit"]);
    // An array claiming 2^60 strings, and a string value 2^62 bytes long.
    let w = Writer::new().kv("arr", MetaValue::Array(vec![MetaValue::Str("x".into())]));
    let mut h = w.bytes();
    let count_at = 24 + 8 + 3 + 4 + 4;
    h[count_at..count_at + 8].copy_from_slice(&(1u64 << 60).to_le_bytes());
    err(&h, &["field `arr`", "array length 1152921504606846976 cannot fit"]);
    let mut h = Writer::new().kv("s", MetaValue::Str("abc".into())).bytes();
    h[24 + 8 + 1 + 4..][..8].copy_from_slice(&(1u64 << 62).to_le_bytes());
    err(&h, &["field `s`", "string length"]);
}

#[test]
fn refuses_bad_alignment() {
    for v in [MetaValue::U32(0), MetaValue::U32(48), MetaValue::U64(1 << 32), MetaValue::Str("32".into())] {
        err(&small().kv("general.alignment", v).bytes(), &["general.alignment", "power of two"]);
    }
}

#[test]
fn refuses_misaligned_offsets_ranges_past_the_end_and_overlaps() {
    let mut w = small();
    w.tensors[1].3 = 33;
    err(&w.bytes(), &["tensor `b`", "not a multiple of the alignment 32"]);
    let mut b = small().bytes();
    b.pop();
    err(&b, &["tensor `b`", "past the end of the file"]);
    let mut w = small();
    w.tensors[1].3 = !31; // u64::MAX rounded down to the alignment
    err(&w.bytes(), &["tensor `b`", "past the end"]);
    let mut w = small().tensor("c", &[8], 0);
    w.tensors[2].3 = 0;
    err(&w.bytes(), &["tensor `c`", "overlaps tensor `a`"]);
}

#[test]
fn refuses_bad_shapes_and_types() {
    err(&small().tensor("big", &[1 << 32, 1 << 32, 1 << 32], 0).bytes(), &["tensor `big`", "element count overflows"]);
    err(&small().tensor("big", &[1 << 31, 1 << 31], 0).bytes(), &["tensor `big`", "byte size of f32 data overflows"]);
    err(&small().tensor("z", &[4, 0], 0).bytes(), &["tensor `z`", "dimension 1 is 0"]);
    err(&small().tensor("r", &[33], 8).bytes(), &["tensor `r`", "row length 33 is not a whole number of q8_0 blocks"]);
    for dims in [&[][..], &[1, 1, 1, 1, 1]] {
        err(&small().tensor("d", dims, 0).bytes(), &["tensor `d`", "n_dims"]);
    }
    err(&small().tensor("q", &[32], 3).bytes(), &["tensor `q`", "Q4_1 (3) is not supported"]);
    err(&small().tensor("q", &[256], 13).bytes(), &["tensor `q`", "Q5_K (13)"]);
    err(&small().tensor("q", &[256], 23).bytes(), &["tensor `q`", "IQ4_XS (23)"]);
    err(&small().tensor("q", &[32], 999).bytes(), &["tensor `q`", "unknown (999)"]);
}

#[test]
fn refuses_duplicates_bad_keys_and_bad_values() {
    err(&small().kv("general.architecture", MetaValue::U8(1)).bytes(), &["general.architecture", "duplicate key"]);
    err(&small().tensor("a", &[4], 0).bytes(), &["tensor `a`", "duplicate tensor name"]);
    let mut w = small();
    w.kvs[0].0 = vec![b'k', 0xff, 0xfe];
    err(&w.bytes(), &["metadata key #0", "not valid UTF-8"]);
    w.kvs[0].0 = Vec::new();
    err(&w.bytes(), &["metadata key #0", "empty key"]);
    let mut w = small();
    w.tensors[0].0 = vec![0xc3];
    err(&w.bytes(), &["tensor #0 name", "not valid UTF-8"]);
    // Invalid UTF-8 in a string value, inside nested arrays: the key and index are named.
    let inner = MetaValue::Array(vec![MetaValue::Str("ok".into()), MetaValue::Str("zz".into())]);
    let mut b = Writer::new().kv("tok", MetaValue::Array(vec![inner])).bytes();
    let at = b.len() - 2;
    b[at] = 0xff;
    err(&b, &["field `tok[0][1]`", "not valid UTF-8"]);
    let mut b = Writer::new().kv("flag", MetaValue::Bool(true)).bytes();
    *b.last_mut().unwrap() = 2;
    err(&b, &["field `flag`", "bool byte 0x02"]);
    let mut b = Writer::new().kv("x", MetaValue::U8(0)).bytes();
    b[24 + 8 + 1..][..4].copy_from_slice(&13u32.to_le_bytes());
    err(&b, &["field `x`", "unknown value type 13"]);
}

#[test]
fn refuses_arrays_nested_too_deep() {
    let nest = |depth: usize| (0..depth).fold(MetaValue::U8(7), |v, _| MetaValue::Array(vec![v]));
    assert!(parse(Path::new("t.gguf"), &Writer::new().kv("n", nest(MAX_ARRAY_DEPTH)).bytes()).is_ok());
    err(&Writer::new().kv("n", nest(MAX_ARRAY_DEPTH + 1)).bytes(), &["field `n[0][0][0][0][0][0][0][0]`", "nested more than 8"]);
}

#[test]
fn corpus_parses_and_survives_bounded_fuzzing() {
    crate::fuzzing::bounded_test(&crate::gguf::fuzz::Gguf, 0x6767_7566, 100_000);
}

/// A real model, when present (not in CI): `cargo test --release --lib gguf -- --ignored`.
#[test]
#[ignore = "needs /tmp/gemma/gemma-3-270m-q4_k_m.gguf"]
fn reads_gemma_3_270m() {
    let f = GgufFile::open(Path::new("/tmp/gemma/gemma-3-270m-q4_k_m.gguf")).unwrap();
    assert_eq!(f.tensors.len(), 236);
    assert_eq!(f.metadata.str_opt("general.architecture").unwrap(), Some("gemma3"));
    let t = f.tensor("token_embd.weight").unwrap();
    assert_eq!((t.format, t.dims.as_slice()), (WeightFormat::Q8_0, &[640, 262144][..]));
    assert_eq!(f.bytes(t).len(), 640 * 262144 / 32 * 34);
}
