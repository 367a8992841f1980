//! The GGUF container: header, metadata, tensor directory (see the module docs).
//!
//! `parse` is the whole parser, on bytes; `GgufFile::open` maps a file and calls it. The file
//! is untrusted: every count is bounded by the bytes left before anything is allocated, every
//! size and offset is computed with checked arithmetic, and every error names the header
//! field, metadata key or tensor at fault.

use std::collections::{BTreeMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use memmap2::Mmap;

use super::{MetaValue, Metadata};
use crate::error::{EngineError, Result};
use crate::tensor::WeightFormat;

pub const MAGIC: &[u8; 4] = b"GGUF";
pub const DEFAULT_ALIGNMENT: usize = 32;
/// Arrays nested deeper than this are refused (real files nest none).
pub const MAX_ARRAY_DEPTH: usize = 8;
pub const MAX_DIMS: usize = 4;

// The smallest encodings, to bound counts by the bytes left.
const MIN_KV_BYTES: usize = 8 + 1 + 4 + 1; // key length, 1-byte key, value type, 1-byte value
const MIN_TENSOR_INFO_BYTES: usize = 8 + 1 + 4 + 8 + 4 + 8; // name, n_dims, 1 dim, type, offset

/// Capacity reserved up front for a counted list; beyond it vectors grow with what is parsed.
const MAX_RESERVE: usize = 1 << 16;

#[derive(Debug, Clone, PartialEq)]
pub struct TensorInfo {
    pub name: String,
    /// GGUF order: dims[0] is the row length (innermost), as ggml's ne[].
    pub dims: Vec<usize>,
    pub format: WeightFormat,
    /// Absolute byte range in the file, checked to lie inside it.
    pub start: usize,
    pub end: usize,
}

impl TensorInfo {
    pub fn elements(&self) -> usize {
        self.dims.iter().product()
    }
}

pub struct GgufFile {
    pub path: PathBuf,
    pub version: u32,
    pub metadata: Metadata,
    pub alignment: usize,
    /// In file order.
    pub tensors: Vec<TensorInfo>,
    pub map: Arc<Mmap>,
}

impl GgufFile {
    /// Maps the file and parses it.
    pub fn open(path: &Path) -> Result<GgufFile> {
        let file = std::fs::File::open(path).map_err(|e| EngineError::file(path, format!("cannot open: {e}")))?;
        // SAFETY: a read-only mapping; as with every mapped checkpoint, the file must not be
        // truncated or rewritten while it is mapped.
        let map = unsafe { Mmap::map(&file) }.map_err(|e| EngineError::file(path, format!("cannot map: {e}")))?;
        let (version, metadata, alignment, tensors) = parse(path, &map)?;
        Ok(GgufFile { path: path.to_path_buf(), version, metadata, alignment, tensors, map: Arc::new(map) })
    }

    pub fn tensor(&self, name: &str) -> Option<&TensorInfo> {
        self.tensors.iter().find(|t| t.name == name)
    }

    /// The data of `t`, one of this file's tensors (panics on a range not from this file).
    pub fn bytes(&self, t: &TensorInfo) -> &[u8] {
        &self.map[t.start..t.end]
    }
}

/// A failure inside the parser: where inside a value (`[3][0]`, empty at top level) and what.
type Fail = (String, String);
type Parsed<T> = std::result::Result<T, Fail>;

fn fail<T>(message: impl Into<String>) -> Parsed<T> {
    Err((String::new(), message.into()))
}

struct Cursor<'a> {
    bytes: &'a [u8],
    pos: usize,
}

impl<'a> Cursor<'a> {
    fn left(&self) -> usize {
        self.bytes.len().saturating_sub(self.pos)
    }

    fn take(&mut self, n: usize) -> Parsed<&'a [u8]> {
        let end = self.pos.checked_add(n).filter(|&e| e <= self.bytes.len());
        match end.and_then(|e| self.bytes.get(self.pos..e).map(|s| (e, s))) {
            Some((e, s)) => {
                self.pos = e;
                Ok(s)
            }
            None => fail(format!("truncated: {n} bytes needed at offset {}, {} left", self.pos, self.left())),
        }
    }

    fn array<const N: usize>(&mut self) -> Parsed<[u8; N]> {
        let s = self.take(N)?;
        s.try_into().or_else(|_| fail("internal: short read"))
    }

    fn u8(&mut self) -> Parsed<u8> {
        Ok(self.array::<1>()?[0])
    }
    fn u32(&mut self) -> Parsed<u32> {
        self.array().map(u32::from_le_bytes)
    }
    fn u64(&mut self) -> Parsed<u64> {
        self.array().map(u64::from_le_bytes)
    }

    /// A u64 count of items of at least `min` bytes each, checked to fit in the bytes left.
    fn count(&mut self, min: usize, what: &str) -> Parsed<usize> {
        let n = self.u64()?;
        let fits = self.left() / min.max(1);
        match usize::try_from(n) {
            Ok(n) if n <= fits => Ok(n),
            _ => fail(format!("{what} {n} cannot fit in the {} bytes left (at least {min} bytes each)", self.left())),
        }
    }

    /// A GGUF string's bytes (u64 length, then the bytes; UTF-8 is the caller's to check).
    fn string(&mut self) -> Parsed<&'a [u8]> {
        let n = self.count(1, "string length")?;
        self.take(n)
    }

    fn utf8(&mut self) -> Parsed<&'a str> {
        let b = self.string()?;
        std::str::from_utf8(b).or_else(|e| fail(format!("string is not valid UTF-8 ({e}): {}", preview(b))))
    }
}

/// The start of untrusted bytes, for messages.
fn preview(b: &[u8]) -> String {
    let head = String::from_utf8_lossy(b.get(..b.len().min(40)).unwrap_or_default()).into_owned();
    format!("{head:?}{}", if b.len() > 40 { "..." } else { "" })
}

/// The smallest encoding of a value of GGUF type `ty` (None: not a type).
fn min_value_bytes(ty: u32) -> Option<usize> {
    Some(match ty {
        0 | 1 | 7 => 1,
        2 | 3 => 2,
        4..=6 => 4,
        8 | 10..=12 => 8,
        9 => 4 + 8,
        _ => return None,
    })
}

/// One value of type `ty`; arrays recurse, `depth` levels deep so far.
fn read_value(c: &mut Cursor<'_>, ty: u32, depth: usize) -> Parsed<MetaValue> {
    use MetaValue as V;
    Ok(match ty {
        0 => V::U8(c.u8()?),
        1 => V::I8(i8::from_le_bytes(c.array()?)),
        2 => V::U16(u16::from_le_bytes(c.array()?)),
        3 => V::I16(i16::from_le_bytes(c.array()?)),
        4 => V::U32(c.u32()?),
        5 => V::I32(i32::from_le_bytes(c.array()?)),
        6 => V::F32(f32::from_le_bytes(c.array()?)),
        7 => match c.u8()? {
            0 => V::Bool(false),
            1 => V::Bool(true),
            b => return fail(format!("bool byte {b:#04x} is neither 0 nor 1")),
        },
        8 => V::Str(c.utf8()?.to_owned()),
        9 => {
            if depth >= MAX_ARRAY_DEPTH {
                return fail(format!("arrays nested more than {MAX_ARRAY_DEPTH} deep"));
            }
            let elem = c.u32()?;
            let Some(min) = min_value_bytes(elem) else { return fail(format!("unknown array element type {elem}")) };
            let n = c.count(min, "array length")?;
            let mut items = Vec::with_capacity(n.min(MAX_RESERVE));
            for i in 0..n {
                items.push(read_value(c, elem, depth + 1).map_err(|(at, m)| (format!("[{i}]{at}"), m))?);
            }
            V::Array(items)
        }
        10 => V::U64(c.u64()?),
        11 => V::I64(i64::from_le_bytes(c.array()?)),
        12 => V::F64(f64::from_le_bytes(c.array()?)),
        _ => return fail(format!("unknown value type {ty}")),
    })
}

/// The name of ggml type `id`, as ggml spells it.
pub fn ggml_type_name(id: u32) -> &'static str {
    #[rustfmt::skip]
    const NAMES: [&str; 40] = [
        "F32", "F16", "Q4_0", "Q4_1", "Q4_2 (removed)", "Q4_3 (removed)", "Q5_0", "Q5_1", "Q8_0", "Q8_1", "Q2_K", "Q3_K", "Q4_K", "Q5_K",
        "Q6_K", "Q8_K", "IQ2_XXS", "IQ2_XS", "IQ3_XXS", "IQ1_S", "IQ4_NL", "IQ3_S", "IQ2_S", "IQ4_XS", "I8", "I16", "I32", "I64", "F64",
        "IQ1_M", "BF16", "Q4_0_4_4 (removed)", "Q4_0_4_8 (removed)", "Q4_0_8_8 (removed)", "TQ1_0", "TQ2_0", "IQ4_NL_4_4 (removed)",
        "IQ4_NL_4_8 (removed)", "IQ4_NL_8_8 (removed)", "MXFP4",
    ];
    NAMES.get(id as usize).copied().unwrap_or("unknown")
}

/// The weight format of ggml type `id`, if the engine has one.
pub fn ggml_format(id: u32) -> Option<WeightFormat> {
    Some(match id {
        0 => WeightFormat::F32,
        1 => WeightFormat::F16,
        2 => WeightFormat::Q4_0,
        6 => WeightFormat::Q5_0,
        8 => WeightFormat::Q8_0,
        12 => WeightFormat::Q4K,
        14 => WeightFormat::Q6K,
        30 => WeightFormat::Bf16,
        _ => return None,
    })
}

/// One entry of the tensor directory before its data range is placed.
struct RawTensor {
    name: String,
    dims: Vec<usize>,
    format: WeightFormat,
    offset: u64,
    bytes: usize,
}

/// The parser proper, on bytes: (version, metadata, alignment, tensors in file order).
/// `path` is only named in errors (and kept as the metadata's path).
pub fn parse(path: &Path, bytes: &[u8]) -> Result<(u32, Metadata, usize, Vec<TensorInfo>)> {
    let field = |name: &str, (at, m): Fail| EngineError::field(path, format!("{name}{at}"), m);
    let mut c = Cursor { bytes, pos: 0 };

    let magic: [u8; 4] = c.array().map_err(|f| field("magic", f))?;
    if &magic != MAGIC {
        return Err(EngineError::file(path, format!("not a GGUF file: magic {} is not \"GGUF\"", preview(&magic))));
    }
    let version = c.u32().map_err(|f| field("version", f))?;
    match version {
        2 | 3 => {}
        1 => return Err(EngineError::field(path, "version", "GGUF version 1 is not supported (v2 and v3 are)")),
        v if (1..=3).contains(&v.swap_bytes()) => {
            let msg = format!("big-endian GGUF (version {} byte-swapped) is not supported; convert the file to little endian", v.swap_bytes());
            return Err(EngineError::field(path, "version", msg));
        }
        v => return Err(EngineError::field(path, "version", format!("unsupported GGUF version {v} (v2 and v3 are supported)"))),
    }
    let tensor_count = c.count(MIN_TENSOR_INFO_BYTES, "tensor count").map_err(|f| field("tensor_count", f))?;
    let kv_count = c.count(MIN_KV_BYTES, "metadata count").map_err(|f| field("kv_count", f))?;

    let mut values = BTreeMap::new();
    for i in 0..kv_count {
        let entry = format!("metadata key #{i}");
        let key = c.utf8().map_err(|f| field(&entry, f))?;
        if key.is_empty() {
            return Err(EngineError::field(path, entry, "empty key"));
        }
        if values.contains_key(key) {
            return Err(EngineError::field(path, key, format!("duplicate key ({entry})")));
        }
        let ty = c.u32().map_err(|f| field(key, f))?;
        let value = read_value(&mut c, ty, 0).map_err(|f| field(key, f))?;
        values.insert(key.to_owned(), value);
    }
    let metadata = Metadata { path: path.to_path_buf(), values };
    let alignment = alignment(path, &metadata)?;

    let mut raw = Vec::with_capacity(tensor_count.min(MAX_RESERVE));
    let mut names = HashSet::new();
    for i in 0..tensor_count {
        let name = c.utf8().map_err(|f| field(&format!("tensor #{i} name"), f))?;
        if name.is_empty() {
            return Err(EngineError::field(path, format!("tensor #{i} name"), "empty tensor name"));
        }
        if !names.insert(name) {
            return Err(EngineError::tensor(path, name, format!("duplicate tensor name (tensor #{i})")));
        }
        raw.push(tensor_info(&mut c, name).map_err(|(_, m)| EngineError::tensor(path, name, m))?);
    }

    // The data section starts at the first multiple of the alignment after the directory.
    let data_start = c.pos.checked_add(alignment - 1).map(|p| p & !(alignment - 1));
    let mut tensors = Vec::with_capacity(raw.len());
    for t in raw {
        let err = |m: String| EngineError::tensor(path, &t.name, m);
        if t.offset % alignment as u64 != 0 {
            return Err(err(format!("data offset {} is not a multiple of the alignment {alignment}", t.offset)));
        }
        let start = usize::try_from(t.offset).ok().zip(data_start).and_then(|(o, d)| d.checked_add(o));
        let end = start.and_then(|s| s.checked_add(t.bytes));
        let Some((start, end)) = start.zip(end).filter(|&(_, e)| e <= bytes.len()) else {
            let msg = format!("data ({} bytes at offset {} of the data section) lies past the end of the file ({} bytes)", t.bytes, t.offset, bytes.len());
            return Err(err(msg));
        };
        tensors.push(TensorInfo { name: t.name, dims: t.dims, format: t.format, start, end });
    }

    let mut order: Vec<&TensorInfo> = tensors.iter().collect();
    order.sort_by_key(|t| t.start);
    for w in order.windows(2) {
        if let [a, b] = w {
            if a.end > b.start {
                let msg = format!("data [{}, {}) overlaps tensor `{}` [{}, {})", b.start, b.end, a.name, a.start, a.end);
                return Err(EngineError::tensor(path, &b.name, msg));
            }
        }
    }
    Ok((version, metadata, alignment, tensors))
}

/// `general.alignment`: a power of two that fits a u32 (32 when absent).
fn alignment(path: &Path, metadata: &Metadata) -> Result<usize> {
    const KEY: &str = "general.alignment";
    let Some(v) = metadata.get(KEY) else { return Ok(DEFAULT_ALIGNMENT) };
    match v.as_u64().filter(|&a| a.is_power_of_two() && a <= u32::MAX as u64).and_then(|a| usize::try_from(a).ok()) {
        Some(a) => Ok(a),
        None => Err(EngineError::field(path, KEY, format!("must be a power of two from 1 to 2^31, found {} {v:?}", v.type_name()))),
    }
}

/// The rest of one directory entry after its name: shape, type, offset, checked byte size.
fn tensor_info(c: &mut Cursor<'_>, name: &str) -> Parsed<RawTensor> {
    let n_dims = c.u32()?;
    if !(1..=MAX_DIMS as u32).contains(&n_dims) {
        return fail(format!("n_dims {n_dims} is not in 1..={MAX_DIMS}"));
    }
    let mut dims = Vec::with_capacity(MAX_DIMS);
    for d in 0..n_dims {
        let v = c.u64()?;
        match usize::try_from(v) {
            Ok(0) => return fail(format!("dimension {d} is 0")),
            Ok(v) => dims.push(v),
            Err(_) => return fail(format!("dimension {d} ({v}) is too large")),
        }
    }
    let id = c.u32()?;
    let Some(format) = ggml_format(id) else {
        let supported = "F32, F16, BF16, Q8_0, Q4_0, Q5_0, Q4_K, Q6_K";
        return fail(format!("ggml type {} ({id}) is not supported (supported: {supported})", ggml_type_name(id)));
    };
    let offset = c.u64()?;

    let Some(elements) = dims.iter().try_fold(1usize, |p, &d| p.checked_mul(d)) else {
        return fail(format!("dimensions {dims:?}: element count overflows"));
    };
    let (per_block, block_bytes) = format.block();
    let row = dims.first().copied().unwrap_or(0);
    if row % per_block != 0 {
        return fail(format!("row length {row} is not a whole number of {} blocks of {per_block} weights", format.name()));
    }
    let Some(bytes) = (elements / per_block).checked_mul(block_bytes) else {
        return fail(format!("dimensions {dims:?}: byte size of {} data overflows", format.name()));
    };
    Ok(RawTensor { name: name.to_owned(), dims, format, offset, bytes })
}

#[cfg(test)]
mod tests {
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
        let corpus = crate::gguf::fuzz::load_corpus(&crate::gguf::fuzz::corpus_dir()).unwrap();
        for seed in &corpus {
            parse(Path::new("seed.gguf"), seed).unwrap();
        }
        let out = crate::gguf::fuzz::run(&corpus, 0x6767_7566, Some(100_000), None);
        if let Some((input, msg)) = out.failure {
            panic!("{msg} on a {}-byte input (run the fuzz_gguf example to save it): {input:02x?}", input.len());
        }
        assert_eq!(out.iterations, 100_000);
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
}
